"""Bad input to `python -m kla_megatron.export_hf` stops it with one line naming the problem and the fix, before
any model is built, and leaves no output folder behind."""

import json
import shutil

import pytest

from export_testing import STEP, model_configs, write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("bad")
    write_run(root / "run", model_configs()["kla"], tokenizer, seed=4)
    return root / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from kla_megatron.export_hf import export

    folder = tmp_path_factory.mktemp("bad_hf") / "kla-hf"
    export(run / "checkpoints", folder)
    return folder


def _error(capsys, *argv) -> str:
    from kla_megatron.export_hf import main

    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export_hf: error: "), lines
    return lines[0]


def test_no_complete_checkpoint(run, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints" / STEP, checkpoints / "step_0000009.partial")
    (checkpoints / "step_0000009.partial" / "state" / "metadata.json").unlink()
    assert "no complete checkpoint (only the half-written step_0000009.partial)" in _error(
        capsys, "--checkpoint", checkpoints, "--output", tmp_path / "out")
    assert "half-written" in _error(capsys, "--checkpoint", checkpoints / "step_0000009.partial", "--output", tmp_path / "out")
    assert "does not exist" in _error(capsys, "--checkpoint", tmp_path / "nowhere", "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(run, tmp_path, capsys):
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    settings = json.loads((moved / "config.json").read_text())
    settings["data"]["tokenizer"] = str(tmp_path / "gone" / "tokenizer.model")
    (moved / "config.json").write_text(json.dumps(settings))
    line = _error(capsys, "--checkpoint", moved / "checkpoints", "--output", tmp_path / "out")
    assert "gone/tokenizer.model does not exist" in line and "--tokenizer" in line
    (moved / "config.json").unlink()
    assert "no run config" in _error(capsys, "--checkpoint", moved / "checkpoints", "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_exists(run, exported, capsys):
    line = _error(capsys, "--checkpoint", run / "checkpoints", "--output", exported)
    assert "already exists: pass --overwrite" in line
    assert "already exists: pass --overwrite" in _error(capsys, "--from-hf", exported, "--output", exported)


def test_import_of_a_folder_that_is_not_ours(exported, tmp_path, capsys):
    other = tmp_path / "llama"
    shutil.copytree(exported, other)
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "model_type": "llama"}))
    assert "model_type 'llama', not 'kla'" in _error(capsys, "--from-hf", other, "--output", tmp_path / "out")
    assert "holds no config.json" in _error(capsys, "--from-hf", tmp_path, "--output", tmp_path / "out")


def test_import_with_mismatched_shapes(exported, tmp_path, capsys):
    altered = tmp_path / "altered"
    shutil.copytree(exported, altered)
    settings = json.loads((altered / "config.json").read_text())
    (altered / "config.json").write_text(json.dumps({**settings, "intermediate_size": 512}))
    line = _error(capsys, "--from-hf", altered, "--output", tmp_path / "out")
    assert "does not match its config.json" in line and "mlp.gate_up_proj.weight has shape (768, 128)" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
