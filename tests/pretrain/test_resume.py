"""A run killed with SIGKILL at any moment resumes from its last complete checkpoint and then
reproduces the uninterrupted run's loss curve exactly."""

import json
import signal
import subprocess

from pretrain_testing import ROOT, pretrain_command, run_pretrain, subprocess_env

STEPS = ["training.steps=8", "checkpoint.interval=3", "eval.interval=4", "eval.iters=1"]


def history(output_dir) -> dict:
    return json.loads((output_dir / "history_rank0.json").read_text())


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_corpus):
    full = run_pretrain(tmp_path / "full", tiny_corpus, *STEPS)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = history(tmp_path / "full")
    assert len(reference["train_loss"]) == 8

    # Kill -9 right after step 5 is logged: step 3's checkpoint is the newest complete one.
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        pretrain_command(killed_dir, tiny_corpus, *STEPS), cwd=ROOT, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step      5/8"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    ckpt = killed_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000003"
    assert not (killed_dir / "history_rank0.json").exists()
    # A kill in the middle of a save leaves a .partial folder: it must be ignored and replaced.
    (ckpt / "step_0000006.partial" / "model").mkdir(parents=True)

    resumed = run_pretrain(killed_dir, tiny_corpus, *STEPS, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    after = history(killed_dir)
    assert sorted(after["train_loss"], key=int) == ["4", "5", "6", "7", "8"]
    for step, loss in after["train_loss"].items():
        assert abs(loss - reference["train_loss"][step]) <= 1e-6 * abs(reference["train_loss"][step]), step
    assert abs(after["valid_loss"]["8"] - reference["valid_loss"]["8"]) <= 1e-6 * reference["valid_loss"]["8"]
    assert not list(ckpt.glob("*.partial"))
    assert (ckpt / "latest").read_text().strip() == "step_0000008"


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
