"""The README's main job, as a new user meets it: `bash slurm/pretrain_kla.sh` without Slurm prepares
the embedded default corpus, trains, tells its story (console, log file, summary) and leaves
TensorBoard events, a checkpoint and a Hugging Face export with a greedy sample from it; run again, it says there is nothing to do; with more steps, it
resumes. Also what such a user reads first: `python -m pretrain --help`, `--print-config`, the
README and the docs, and nothing they cite may be missing from a clone."""

import dataclasses
import json
import re
import subprocess
import sys

import torch

from pretrain_testing import ROOT, subprocess_env

SHORT = ["training.steps=24", "data.seq_length=64", "training.micro_batch_size=4", "training.global_batch_size=8",
         "eval.interval=12", "checkpoint.interval=12", "logging.interval=4"]


def user_env() -> dict:
    """A user's shell: without the DS_ACCELERATOR that tests/conftest.py sets for in-process tests."""
    env = subprocess_env()
    env.pop("DS_ACCELERATOR", None)
    return env


def run_script(output_dir, *overrides):
    env = dict(user_env(), OUTPUT_DIR=str(output_dir), PYTHON=sys.executable, NPROC="1")
    return subprocess.run(["bash", str(ROOT / "slurm" / "pretrain_kla.sh"), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def pretrain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=user_env(),
                          capture_output=True, text=True, timeout=300)


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
    events = sorted((out / "tb").glob("events.out.tfevents.*"))
    assert events
    assert (out / "hf" / "model.safetensors").is_file() and "== greedy sample:\ndef " in first.stdout

    # The console: no third-party noise, GPU figures only on a GPU, the parameter count the docs give.
    assert "Warning" not in first.stderr and "Setting accelerator" not in first.stdout, first.stderr[-3000:]
    assert ("TFLOP/s" in first.stdout) == torch.cuda.is_available()
    (params,) = re.findall(r"training tiny \(kla, ([\d.]+)M parameters", first.stdout)
    assert f"~{params}M-parameter" in (ROOT / "configs" / "tiny.toml").read_text()
    assert f"~{params}M-parameter" in (ROOT / "README.md").read_text()

    # The summary, and the log file holding everything the trainer printed.
    summary = first.stdout[first.stdout.index("== finished: tiny (kla"):].splitlines()
    assert re.fullmatch(r"   steps 1-24 of 24 in \d+:\d\d:\d\d \(12,288 tokens in all\) \| final train loss [\d.]+ \(ppl [\d.]+\)", summary[1])
    assert re.fullmatch(r"   validation at step 24: loss [\d.]+ \(ppl [\d.]+\)", summary[2])
    assert re.fullmatch(r"   throughput [\d,]+ tokens/s(, [\d.]+ TFLOP/s per GPU)? \(mean over this run's steps\)", summary[3])
    assert summary[4:8] == [f"   checkpoint: {out}/checkpoints/step_0000024", f"   TensorBoard: tensorboard --logdir {out}/tb",
                           f"   log: {out}/train.log", f"   loss history: {out}/history_rank0.json"]
    log = (out / "train.log").read_text()
    trainer_lines = first.stdout[first.stdout.index("--resume: no checkpoint"):first.stdout.index("\nexport: ")].splitlines()
    assert [line.split(" ", 2)[2] for line in log.splitlines()[-len(trainer_lines):]] == trainer_lines

    # The same command again: nothing to do, and nothing touched.
    history = (out / "history_rank0.json").read_bytes()
    done = run_script(out, *SHORT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (  # the export is up to date: not written again
        f"nothing to do: {out}/checkpoints/step_0000024 is step 24 and training.steps=24; raise training.steps to train further")
    assert sorted((out / "tb").glob("events.out.tfevents.*")) == events
    assert (out / "history_rank0.json").read_bytes() == history

    # Same command with more steps: the corpus is reused, training continues from step 24, and the
    # history holds the whole run.
    again = run_script(out, *SHORT[1:], "training.steps=30")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already built" in again.stdout
    assert "resumed from" in again.stdout and "at step 24" in again.stdout
    assert f"note: the learning-rate schedule goes on as saved in {out}/checkpoints/step_0000024: training.steps=24 (not 30)" in again.stdout
    assert re.search(r"step     28/30 \| loss [\d.]+ \| lr 3\.000e-04 \|", again.stdout)  # configs/tiny.toml's min_lr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    assert sorted(json.loads((out / "history_rank0.json").read_text())["train_loss"], key=int) == [str(s) for s in range(1, 31)]
    assert "steps 25-30 of 30" in again.stdout


def test_help_lists_every_config_key_with_its_default_and_doc():
    from kla_megatron.config import ModelConfig
    from pretrain.config import TrainConfig

    result = pretrain("--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "Setting accelerator" not in result.stdout
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        value = getattr(defaults, section.name)
        if dataclasses.is_dataclass(value):
            for key in dataclasses.fields(value):
                if key.name != "overrides":
                    assert f"  {section.name}.{key.name} = " in result.stdout, key.name
    for key in dataclasses.fields(ModelConfig):
        assert f"  model.{key.name} = " in result.stdout, key.name
    assert "  training.steps = 100\n      Optimizer steps of the whole run" in result.stdout
    assert '  model.mixer = "kla"\n      kla: Kaczmarz step on raw keys' in result.stdout
    assert "--print-config" in result.stdout


def test_print_config_is_the_resolved_config_as_toml(tmp_path):
    from pretrain.config import load_config

    overrides = ["model.mixer=gdn", "training.steps=7"]
    result = pretrain("--config", "configs/tiny.toml", "--print-config", *overrides)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert 'mixer = "gdn"' in result.stdout and "num_layers = 2" in result.stdout and "steps = 7" in result.stdout
    (tmp_path / "resolved.toml").write_text(result.stdout)
    printed, asked = load_config(str(tmp_path / "resolved.toml")), load_config(str(ROOT / "configs" / "tiny.toml"), overrides)
    assert printed.model.resolve() == asked.model.resolve()
    assert dataclasses.replace(printed, model=asked.model) == asked


def tracked_text_files() -> list:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / p for p in listed if (ROOT / p).suffix in {".md", ".py", ".toml", ".sh", ".json", ".txt", ".log", ""}]


def test_nothing_cited_is_missing_from_a_clone():
    # The names of design notes that once lived outside the repository (spelt apart so this file does not cite them).
    outside = ["DESIGN" + ".md", "ANCHORS" + ".md"]
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for name in outside:
            assert name not in text, f"{path.relative_to(ROOT)} cites {name}, which a clone does not have"
    docs = [ROOT / "README.md", ROOT / "kernels" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert ROOT / "docs" / "design.md" in docs
    for doc in docs:
        for cited in re.findall(r"`((?:docs|bench|kernels|kla_megatron|pretrain|data_prep|slurm|configs|tests)/[\w./-]+\.\w+)`", doc.read_text()):
            assert (ROOT / cited).exists(), f"{doc.relative_to(ROOT)} cites {cited}, which does not exist"


def test_readme_says_what_the_ci_command_installs():
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"bash (\.ci/\w+)", (ROOT / ".ci" / "run").read_text()):
        assert f"`{script}`" in readme, script
    paragraph = readme[readme.index("`.ci/install_slurm`") - 400:readme.index("`.ci/install_slurm`") + 400]
    assert "system-wide" in paragraph and "apt-get" in paragraph and "root" in paragraph
