"""The whole program under every launcher and layout trains like one process.

Three steps of the tiny model on the same global batch: one process (2 micro-batches), two
data-parallel processes started by mpiexec (mpi4py), and tensor parallelism over two processes
started by torchrun. The per-step losses agree to fp32 reduction-order error.

Megatron initialises a TP-sharded weight differently at each TP size, so the TP comparison starts
both runs from one checkpoint (checkpoint.init_from), which dist_checkpointing reshards to TP=2.
"""

import json
import subprocess
import sys

import pytest

from pretrain_testing import ROOT, pretrain_command, run_pretrain, subprocess_env

STEPS = ["training.steps=3", "checkpoint.interval=0", "eval.interval=0"]


def losses(output_dir) -> list[float]:
    (history,) = output_dir.glob("history_rank*.json")
    train = json.loads(history.read_text())["train_loss"]
    return [train[str(s)] for s in range(1, 4)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_corpus) -> list[float]:
    out = tmp_path_factory.mktemp("single")
    result = run_pretrain(out, tiny_corpus, *STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(out)


def launch(launcher: list[str], output_dir, corpus, *overrides) -> subprocess.CompletedProcess:
    command = launcher + pretrain_command(output_dir, corpus, *STEPS, *overrides)[1:]
    return subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def assert_close(ours: list[float], reference: list[float]) -> None:
    for step, (a, b) in enumerate(zip(ours, reference), start=1):
        assert abs(a - b) <= 2e-5 * abs(b), f"step {step}: {a} vs {b}"


def test_mpiexec_data_parallel(tmp_path, tiny_corpus, one_process):
    mpiexec = str(ROOT / ".venv" / "bin" / "mpiexec") if (ROOT / ".venv" / "bin" / "mpiexec").exists() else "mpiexec"
    result = launch([mpiexec, "-n", "2", sys.executable], tmp_path, tiny_corpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (mpi): TP 1 PP 1 CP 1 DP 2" in result.stdout
    assert_close(losses(tmp_path), one_process)


def test_torchrun_tensor_parallel(tmp_path, tiny_corpus):
    base = run_pretrain(tmp_path / "base", tiny_corpus, "training.steps=1", "training.warmup_steps=0", "eval.interval=0")
    assert base.returncode == 0, base.stderr[-3000:]
    init = f'checkpoint.init_from="{tmp_path / "base" / "checkpoints" / "step_0000001"}"'
    single = run_pretrain(tmp_path / "tp1", tiny_corpus, *STEPS, init)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = launch(torchrun, tmp_path / "tp2", tiny_corpus, "parallel.tensor=2", init)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (torchrun): TP 2 PP 1 CP 1 DP 1" in result.stdout
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    assert "initialised the model from" in result.stdout
    assert_close(losses(tmp_path / "tp2"), losses(tmp_path / "tp1"))
