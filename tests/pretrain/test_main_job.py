"""The README's main job: `bash slurm/pretrain_kla.sh` without Slurm prepares the embedded default
corpus, trains, leaves TensorBoard events and a checkpoint, exports it to a Hugging Face folder and prints a greedy
sample from it; run again, it resumes."""

import json
import subprocess
import sys

from pretrain_testing import ROOT, subprocess_env

SHORT = ["training.steps=24", "data.seq_length=64", "training.micro_batch_size=4", "training.global_batch_size=8",
         "eval.interval=12", "checkpoint.interval=12", "logging.interval=4"]


def run_script(output_dir, *overrides):
    env = dict(subprocess_env(), OUTPUT_DIR=str(output_dir), PYTHON=sys.executable, NPROC="1")
    return subprocess.run(["bash", str(ROOT / "slurm" / "pretrain_kla.sh"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_default_job_prepares_data_trains_and_resumes(tmp_path):
    out = tmp_path / "tiny"
    first = run_script(out, *SHORT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["tokens"]["train"] > 1_000_000  # the whole standard library, not a sample
    assert "local run: 1 process(es), config configs/tiny.toml" in first.stdout
    losses = json.loads((out / "history_rank0.json").read_text())["train_loss"]
    assert losses["24"] < losses["1"] - 1.0, losses
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000024"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "hf" / "model.safetensors").is_file() and "== greedy sample:\ndef " in first.stdout

    # Same command with more steps: the corpus is reused and training continues from step 24.
    again = run_script(out, *SHORT[1:], "training.steps=30")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already built" in again.stdout
    assert "resumed from" in again.stdout and "at step 24" in again.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000030"
