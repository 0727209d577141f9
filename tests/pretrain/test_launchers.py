"""The whole program under every launcher and layout trains like one process.

Three steps of the tiny model on the same global batch, from the same seed: one process (2 micro-batches),
two data-parallel processes started by mpiexec (mpi4py), tensor parallelism and context parallelism over two
processes started by torchrun (also with packed documents crossing the ranks), and TP x CP over four. The
per-step losses agree to fp32 reduction-order error: the initial weights do not depend on the layout
(kla_megatron.init), and everything after them is exact. Every process runs one intra-op thread
(pretrain_testing.subprocess_env), so each layout's matmuls reduce in the same order.
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


def assert_torchrun_trains_like_one_process(tmp_path, corpus, overrides, processes, layout, label) -> None:
    """The model of `overrides` trained by one process, then by `processes` under torchrun at `layout`."""
    single = run_pretrain(tmp_path / "one", corpus, *STEPS, *overrides)
    assert single.returncode == 0, single.stderr[-3000:]
    result = launch(torchrun(processes), tmp_path / "parallel", corpus, *overrides, *layout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{processes} process(es) (torchrun): {label}" in result.stdout
    assert_close(losses(tmp_path / "parallel"), losses(tmp_path / "one"))


def test_mpiexec_data_parallel(tmp_path, tiny_corpus, one_process):
    mpiexec = str(ROOT / ".venv" / "bin" / "mpiexec") if (ROOT / ".venv" / "bin" / "mpiexec").exists() else "mpiexec"
    result = launch([mpiexec, "-n", "2", sys.executable], tmp_path, tiny_corpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (mpi): TP 1 PP 1 CP 1 DP 2" in result.stdout
    assert_close(losses(tmp_path), one_process)


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def test_torchrun_tensor_parallel(tmp_path, tiny_corpus, one_process):
    result = launch(torchrun(2), tmp_path, tiny_corpus, "parallel.tensor=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (torchrun): TP 2 PP 1 CP 1 DP 1" in result.stdout
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    assert_close(losses(tmp_path), one_process)


# Context parallelism cuts each sequence into slices of whole 64-token kernel chunks: 128 tokens for 2 ranks.
LONG = ["data.seq_length=128"]
PACKED = ["data.seq_length=128", "data.reset_state_at_eod=true"]


@pytest.mark.parametrize("overrides, processes, layout, label", [
    (LONG, 2, ["parallel.context=2"], "TP 1 PP 1 CP 2 DP 1"),
    (PACKED, 2, ["parallel.context=2"], "TP 1 PP 1 CP 2 DP 1"),
    (LONG, 4, ["parallel.context=2", "parallel.tensor=2"], "TP 2 PP 1 CP 2 DP 1"),
], ids=["cp2", "cp2-packed-documents", "tp2-cp2"])
def test_torchrun_context_parallel(tmp_path, tiny_corpus, short_documents_corpus, overrides, processes, layout, label):
    corpus = short_documents_corpus if overrides is PACKED else tiny_corpus  # documents cross the ranks' slices
    assert_torchrun_trains_like_one_process(tmp_path, corpus, overrides, processes, layout, label)


# Pipelines need layers to split: four (and, for the uneven split, three) layers of the tiny model.
INTERLEAVED = ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]
# Four micro-batches a step (global batch 4 / micro-batch 1): the interleaved schedule's steady state, where a
# stage sends an activation and a gradient to its one neighbour at once; with two, it has only warm-up and cool-down.
FOUR_MICRO_BATCHES = ["model.num_layers=4", "training.micro_batch_size=1"]


@pytest.mark.parametrize("model, processes, layout, label", [
    (["model.num_layers=4", "model.tie_embeddings=true"], 2, INTERLEAVED, "TP 1 PP 2 (x2 interleaved) CP 1 DP 1"),
    ([*FOUR_MICRO_BATCHES, "model.tie_embeddings=true"], 2, INTERLEAVED, "TP 1 PP 2 (x2 interleaved) CP 1 DP 1"),
    ([*FOUR_MICRO_BATCHES, "training.precision=bf16"], 2, INTERLEAVED, "TP 1 PP 2 (x2 interleaved) CP 1 DP 1"),
    (["model.num_layers=3"], 2, ["parallel.pipeline=2", "parallel.pipeline_layers=[2, 1]"], "TP 1 PP 2 CP 1 DP 1"),
    # bf16 (on CPU too): each micro-batch's bf16 gradient is summed in fp32 on every stage, however the pipeline
    # interleaves forwards and backwards (DeepSpeed's end-of-backward accumulation missed micro-batches there).
    (["model.num_layers=4", "training.precision=bf16"], 2, ["parallel.pipeline=2"], "TP 1 PP 2 CP 1 DP 1"),
], ids=["pp2-interleaved-tied-embeddings", "pp2-interleaved-steady-state", "pp2-interleaved-steady-state-bf16",
        "pp2-uneven", "pp2-bf16"])
def test_torchrun_pipeline_parallel(tmp_path, tiny_corpus, model, processes, layout, label):
    assert_torchrun_trains_like_one_process(tmp_path, tiny_corpus, model, processes, layout, label)
