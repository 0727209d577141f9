"""`python -m pytest -m gpu` on a machine without a GPU skips every GPU test with its reason."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `pytest -m gpu` runs the GPU tests")
def test_gpu_tests_skip_with_a_reason_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "tests"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "skipped" in summary and "failed" not in summary and "passed" not in summary and "error" not in summary, summary
    assert "needs a CUDA GPU" in result.stdout
