"""What a Slurm array of tokenize tasks needs (slurm/prepare_data.sh; tests/slurm runs it for real):
each task takes every N-th input file, the inputs can be listed, and the per-shard datasets blend by
glob, weighted by their tokens, into a manifest that pretraining reads."""

import json

from conftest import expected_tokens, read_dataset, write_jsonl
from data_prep.cli import main

TEXTS = [["alpha one", "alpha two"], ["beta"], ["gamma one", "gamma two", "gamma three"], ["delta"], ["epsilon text"]]


def shards(tmp_path) -> list:
    return [write_jsonl(tmp_path / f"part-{i}.jsonl", texts) for i, texts in enumerate(TEXTS)]


def test_a_shard_is_every_nth_input_file(tmp_path, sp_model, sp, capsys):
    shards(tmp_path)
    common = ["tokenize", "--input", str(tmp_path / "part-*.jsonl"), "--tokenizer", sp_model, "--output-prefix",
              str(tmp_path / "out/ds"), "--one-output-per-input", "--num-shards", "2", "--workers", "1"]
    assert main([*common, "--shard-index", "1"]) == 0
    assert "shard 1 of 2: 2 input file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["ds_part-1.bin", "ds_part-3.bin"]
    assert main([*common, "--shard-index", "0"]) == 0
    for i, texts in enumerate(TEXTS):
        assert read_dataset(tmp_path / f"out/ds_part-{i}") == expected_tokens(sp, texts)


def test_shards_need_one_output_per_input_and_a_valid_index(tmp_path, sp_model, capsys):
    shards(tmp_path)
    base = ["tokenize", "--input", str(tmp_path / "part-*.jsonl"), "--tokenizer", sp_model, "--output-prefix", str(tmp_path / "o")]
    assert main([*base, "--num-shards", "2"]) == 2
    assert "--num-shards needs --one-output-per-input" in capsys.readouterr().err
    assert main([*base, "--one-output-per-input", "--num-shards", "2", "--shard-index", "2"]) == 2
    assert "--shard-index 2 must be in [0, --num-shards 2)" in capsys.readouterr().err


def test_list_inputs_in_reading_order(tmp_path, capsys):
    paths = shards(tmp_path)
    assert main(["list-inputs", "--input", str(tmp_path / "part-*.jsonl")]) == 0
    assert capsys.readouterr().out.split() == paths


def test_blend_of_shards_by_glob_weighs_tokens_and_makes_a_manifest(tmp_path, sp_model, capsys):
    shards(tmp_path)
    write_jsonl(tmp_path / "empty.jsonl", [""])
    assert main(["tokenize", "--input", str(tmp_path / "part-*.jsonl"), str(tmp_path / "empty.jsonl"), "--tokenizer", sp_model,
                 "--output-prefix", str(tmp_path / "out/ds"), "--one-output-per-input", "--workers", "1"]) == 0
    manifest_path = tmp_path / "ds.manifest.json"
    assert main(["blend", "--datasets", str(tmp_path / "out/ds_part-*"), str(tmp_path / "out/ds_empty"),
                 "--valid-datasets", str(tmp_path / "out/ds_part-4"), "--output", str(manifest_path)]) == 0
    manifest = json.loads(manifest_path.read_text())
    prefixes = [str(tmp_path / f"out/ds_part-{i}") for i in range(len(TEXTS))]  # the empty dataset left out
    tokens = [json.loads(open(p + ".json").read())["tokens"] for p in prefixes]
    assert manifest["train_prefixes"] == prefixes and manifest["valid_prefixes"] == prefixes[-1:]
    assert manifest["train_weights"] == [t / sum(tokens) for t in tokens] and manifest["valid_weights"] == [1.0]
    assert manifest["tokenizer_model"] == sp_model
    assert "blend (train): 5 dataset(s)" in capsys.readouterr().out

    from pretrain.config import DataSection
    from pretrain.data import DataFiles

    files = DataFiles.resolve(DataSection(manifest=str(manifest_path)))
    assert (files.train.prefixes, files.train.weights) == (prefixes, manifest["train_weights"])
    assert files.valid.prefixes == prefixes[-1:]
