"""slurm/prepare_data.sh: a corpus of five shards tokenized by a Slurm array of two tasks (shards 0, 2,
4 and 1, 3), then blended by a job that waits for the array. Every shard's dataset is byte-identical
to `data_prep tokenize` of the same shards in one process, and the blend is a manifest that pretraining
reads: every shard's train and valid dataset, weighted by its tokens."""

import json
import re
import subprocess
import sysconfig
from pathlib import Path

from conftest import ROOT, job_env

SHARDS = 5


def write_shards(directory: Path) -> list:
    """Five JSONL shards of real text: the standard library's modules, one document each."""
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[: 8 * SHARDS]
    paths = []
    for shard in range(SHARDS):
        path = directory / f"web-{shard:02d}.jsonl"
        with open(path, "w") as f:
            for module in modules[shard::SHARDS]:
                f.write(json.dumps({"text": module.read_text(errors="replace")}) + "\n")
        paths.append(path)
    return paths


def test_array_job_tokenizes_shards_and_blends_them(cluster, corpus, tmp_path):
    write_shards(tmp_path)
    prefix = tmp_path / "out" / "web"
    env = dict(INPUT=str(tmp_path / "web-*.jsonl"), TOKENIZER=corpus["tokenizer_model"], OUTPUT_PREFIX=str(prefix),
               TASKS="2", VALID_FRACTION="0.2")
    submitted = cluster.command("bash", "slurm/prepare_data.sh", "--", "--cpus-per-task=1", "--time=10",
                                f"--output={tmp_path}/array-%A_%a.out", env=env, timeout=120)
    found = re.search(r"submitted array job (\d+) \(2 task\(s\) over 5 input file\(s\)\) and blend job (\d+)", submitted.stdout)
    assert found, submitted.stdout + submitted.stderr
    array, blend = found.groups()
    final = cluster.finished(blend, 300)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("array-*.out")))
    why = logs + cluster.report(blend)
    assert final["JobState"] == "COMPLETED" and final.get("ExitCode") == "0:0", why
    assert "shard 0 of 2: 3 input file(s)" in logs and "shard 1 of 2: 2 input file(s)" in logs, why
    assert "blend (train): 5 dataset(s)" in logs and "blend (valid): 5 dataset(s)" in logs, why

    # The same shards in one process: byte-identical datasets.
    local = tmp_path / "local" / "web"
    command = [job_env()["PYTHON"], "-m", "data_prep", "tokenize", "--input", str(tmp_path / "web-*.jsonl"), "--tokenizer",
               corpus["tokenizer_model"], "--output-prefix", str(local), "--one-output-per-input", "--valid-fraction", "0.2",
               "--workers", "1"]
    result = subprocess.run(command, cwd=ROOT, env=dict(job_env(), PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for shard in range(SHARDS):
        for split in ("train", "valid"):
            for suffix in (".bin", ".idx"):
                ours = Path(f"{prefix}_web-{shard:02d}_{split}{suffix}")
                assert ours.read_bytes() == Path(f"{local}_web-{shard:02d}_{split}{suffix}").read_bytes(), ours

    manifest = json.loads(Path(f"{prefix}.manifest.json").read_text())
    for split in ("train", "valid"):
        expected = [f"{prefix}_web-{shard:02d}_{split}" for shard in range(SHARDS)]
        assert manifest[f"{split}_prefixes"] == expected
        tokens = [json.loads(Path(p + ".json").read_text())["tokens"] for p in expected]
        assert all(tokens)
        weights = manifest[f"{split}_weights"]
        assert abs(sum(weights) - 1) < 1e-12
        assert all(abs(w - t / sum(tokens)) < 1e-12 for w, t in zip(weights, tokens))

    from pretrain.config import DataSection
    from pretrain.data import DataFiles

    files = DataFiles.resolve(DataSection(manifest=f"{prefix}.manifest.json"))
    assert files.train.prefixes == manifest["train_prefixes"] and files.train.weights == manifest["train_weights"]
    assert files.valid.prefixes == manifest["valid_prefixes"] and files.tokenizer == corpus["tokenizer_model"]
