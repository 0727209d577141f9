import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter and DeepSpeed uses its CPU
# accelerator. Both read these at import time, so they are set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    """`pytest -m gpu` on a machine without a GPU skips every GPU test, with the reason: one rule
    here, so a new GPU test cannot forget it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
