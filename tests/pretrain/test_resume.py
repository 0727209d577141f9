"""An interrupted run resumes from its last complete checkpoint and then reproduces the
uninterrupted run's loss curve exactly: after kill -9 at any moment, after the SIGUSR1 that Slurm
sends before the time limit (which makes the run checkpoint and stop; so does a SIGTERM to all of the job's
processes during the first step), and at another parallel
layout, whose checkpoint is resharded (weights, AdamW state and data position). The loss history and
TensorBoard then hold the whole run, each step once; a finished run resumed again does nothing, and
one resumed with another model is refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch

from pretrain_testing import ROOT, pretrain_command, run_pretrain, subprocess_env

STEPS = ["training.steps=8", "checkpoint.interval=3", "eval.interval=4", "eval.iters=1"]


def history(output_dir) -> dict:
    (path,) = output_dir.glob("history_rank*.json")  # written by the last pipeline stage
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_corpus):
    out = tmp_path_factory.mktemp("uninterrupted")
    full = run_pretrain(out, tiny_corpus, *STEPS)
    assert full.returncode == 0, full.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(uninterrupted) -> dict:
    result = history(uninterrupted)
    assert len(result["train_loss"]) == 8
    return {**result, "output_dir": uninterrupted}


def tensorboard_steps(output_dir, tag="train/loss") -> Counter:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tb"))
    events.Reload()
    return Counter(e.step for e in events.Scalars(tag))


def interrupt(output_dir, corpus, when: str, sig: signal.Signals, whole_group: bool = False) -> subprocess.Popen:
    """Runs training and sends `sig` once a line starting with `when` is logged, to the trainer or (whole_group,
    as Slurm and `timeout` do) to every process it started as well; returns the finished process."""
    proc = subprocess.Popen(
        pretrain_command(output_dir, corpus, *STEPS), cwd=ROOT, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    proc.log = []
    try:
        for line in proc.stdout:
            proc.log.append(line)
            if line.startswith(when):
                if whole_group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
                if sig == signal.SIGKILL:
                    break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # hung: leave nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
    return proc


def after_step(step: int) -> str:
    return f"step {step:>6}/8"


def assert_matches(after: dict, reference: dict, steps: list[str], tolerance: float = 1e-6) -> None:
    assert sorted(after["train_loss"], key=int) == steps
    for step, loss in after["train_loss"].items():
        assert abs(loss - reference["train_loss"][step]) <= tolerance * abs(reference["train_loss"][step]), step
    assert after["valid_loss"].keys() == {s for s in reference["valid_loss"] if s in steps}
    for step, loss in after["valid_loss"].items():
        assert abs(loss - reference["valid_loss"][step]) <= tolerance * reference["valid_loss"][step], step


def resume_elsewhere(source, output_dir, corpus, step: int, launcher: list[str], *overrides) -> subprocess.CompletedProcess:
    """Copies checkpoint `step` of the run in `source` to a new output_dir and resumes it there with
    `launcher` (e.g. torchrun) and `overrides` (another layout)."""
    checkpoints = output_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / f"step_{step:07d}", checkpoints / f"step_{step:07d}")
    (checkpoints / "latest").write_text(f"step_{step:07d}\n")
    command = launcher + pretrain_command(output_dir, corpus, *STEPS, *overrides, resume=True)[1:]
    return subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_corpus, reference):
    # Kill -9 right after step 5 is logged: step 3's checkpoint is the newest complete one.
    killed_dir = tmp_path / "killed"
    proc = interrupt(killed_dir, tiny_corpus, after_step(5), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "".join(proc.log)[-3000:]
    ckpt = killed_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000003"
    assert sorted(history(killed_dir)["train_loss"], key=int) == ["1", "2", "3"]  # saved with the checkpoint
    # A kill in the middle of a save leaves a .partial folder: it must be ignored and replaced.
    (ckpt / "step_0000006.partial" / "model").mkdir(parents=True)

    resumed = run_pretrain(killed_dir, tiny_corpus, *STEPS, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert_matches(history(killed_dir), reference, [str(s) for s in range(1, 9)])
    # Steps 4 and 5 of the killed run were taken again: TensorBoard shows each step once.
    assert tensorboard_steps(killed_dir) == Counter(range(1, 9))
    assert not list(ckpt.glob("*.partial"))
    assert (ckpt / "latest").read_text().strip() == "step_0000008"


def test_sigusr1_checkpoints_stops_and_resumes_exactly(tmp_path, tiny_corpus, reference):
    out = tmp_path / "signalled"
    proc = interrupt(out, tiny_corpus, after_step(4), signal.SIGUSR1)
    log = "".join(proc.log)
    assert proc.returncode == 0, log[-3000:]
    # The signal lands during step 4's logging or step 5; the run stops right after that step.
    stopped = int(log.split("stopping at step ")[1].split()[0])
    assert stopped in (4, 5), log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    resumed = run_pretrain(out, tiny_corpus, *STEPS, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stdout
    assert_matches(history(out), reference, [str(s) for s in range(1, 9)])


def test_a_sigterm_to_the_whole_job_during_the_first_step_stops_it_with_a_checkpoint(tmp_path, tiny_corpus):
    """Slurm and `timeout` signal every process of the job. Sent right after start-up, the signal lands in the
    first step; on a GPU while it compiles (megatron's fused SwiGLU through torch.compile, our Triton kernels).
    The run must still finish that step, checkpoint and stop, not hang on a compile worker the signal killed."""
    out = tmp_path / "terminated"
    proc = interrupt(out, tiny_corpus, "training tiny", signal.SIGTERM, whole_group=True)
    log = "".join(proc.log)
    assert proc.returncode == 0, log[-3000:]
    assert "stopping at step 1" in log, log[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"


def test_a_finished_run_resumed_says_so_and_changes_nothing(uninterrupted, tiny_corpus):
    before = {p: p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file() and "data_cache" not in p.parts}
    again = run_pretrain(uninterrupted, tiny_corpus, *STEPS, resume=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines() == [
        f"nothing to do: {uninterrupted}/checkpoints/step_0000008 is step 8 and training.steps=8; raise training.steps to train further"
    ]
    after = {p: p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file() and "data_cache" not in p.parts}
    assert after == before  # no new event file, the same history, log and checkpoints


def test_resume_at_another_layout_continues_the_loss(tmp_path, tiny_corpus, reference):
    """One process saved step 6; two data-parallel processes under ZeRO-2 take it over: each now
    holds half of AdamW's state and reads half of every global batch, and steps 7-8 are the
    uninterrupted run's to fp32 reduction order (2e-5, as for the launchers' layouts)."""
    resumed = resume_elsewhere(reference["output_dir"], tmp_path / "dp2", tiny_corpus, 6, torchrun(2), "parallel.zero_stage=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 6" in resumed.stdout
    assert "DP 2" in resumed.stdout
    assert_matches(history(tmp_path / "dp2"), reference, ["7", "8"], tolerance=2e-5)


def test_training_loss_falls_and_tensorboard_has_the_scalars(tmp_path, tiny_corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_pretrain(tmp_path, tiny_corpus, "training.steps=30", "eval.interval=15", "checkpoint.interval=0")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = history(tmp_path)["train_loss"]
    first = sum(losses[str(s)] for s in range(1, 4)) / 3
    last = sum(losses[str(s)] for s in range(28, 31)) / 3
    assert last < first - 0.5, (first, last)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops_per_gpu",
            "perf/peak_memory_gib", "valid/loss", "valid/ppl"} <= tags
    assert len(events.Scalars("train/loss")) == 30
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    assert "ETA" in result.stdout


def test_resuming_with_another_model_is_refused(uninterrupted, tiny_corpus):
    # Same shapes, so the weights would load: without the check a KLA run would go on as GDN.
    result = run_pretrain(uninterrupted, tiny_corpus, *STEPS, "training.steps=9", "model.mixer=gdn", resume=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {uninterrupted}/checkpoints/step_0000008 holds another model than this run asks for "
        "(model.mixer 'kla' -> 'gdn'); resume with the same model settings, or train the new model in a new output_dir"
    ]


# (GPUs, overrides) of the uninterrupted run, then of the run that resumes its step-6 checkpoint.
GPU_RESHARDS = {
    "tp2-to-pp2": ((2, ["parallel.tensor=2"]), (2, ["parallel.pipeline=2"])),
    "pp2-to-pp1": ((2, ["parallel.pipeline=2"]), (1, [])),
    "dp2-to-dp1": ((2, ["parallel.zero_stage=2"]), (1, [])),
}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GPU_RESHARDS))
def test_resharded_resume_on_two_gpus(tmp_path, tiny_corpus, case, precision):
    """Steps 7-8 after a resume at another layout are the uninterrupted run's: to fp32 reduction
    order in fp32 (2e-5), to bf16 rounding of the forward in bf16 (1e-2: the fp32 masters and
    moments come back exactly, but TP and PP round the bf16 activations differently)."""
    (gpus, overrides), (resume_gpus, resume_overrides) = GPU_RESHARDS[case]
    dtype = f"training.precision={precision}"
    full = subprocess.run(torchrun(gpus) + pretrain_command(tmp_path / "full", tiny_corpus, *STEPS, dtype, *overrides)[1:],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = resume_elsewhere(tmp_path / "full", tmp_path / "resumed", tiny_corpus, 6, torchrun(resume_gpus), dtype, *resume_overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 6" in resumed.stdout
    assert_matches(history(tmp_path / "resumed"), history(tmp_path / "full"), ["7", "8"], 2e-5 if precision == "fp32" else 1e-2)
