"""megatron-core's GPTDataset, built by BlendedMegatronDatasetBuilder over our outputs, trains a model."""

import types

import pytest
import torch

from conftest import write_jsonl
from data_prep.blend import describe_blend
from data_prep.cli import main
from data_prep.inputs import InputError


@pytest.fixture
def prepared(tmp_path, sp_model, documents):
    """Two datasets tokenized with the same tokenizer."""
    prefixes = []
    for name, texts in (("code", documents[:-7]), ("misc", documents[-7:] * 10)):
        corpus = write_jsonl(tmp_path / f"{name}.jsonl", texts)
        assert main(["tokenize", "--input", corpus, "--tokenizer", sp_model, "--output-prefix", str(tmp_path / name)]) == 0
        prefixes.append(str(tmp_path / name))
    return prefixes


def _gpt_datasets(tmp_path, blend, eod, pad, sequence_length=32):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = types.SimpleNamespace(eod=eod, pad=pad, vocab_size=500, unique_identifiers={"class": "test"})
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=sequence_length,
        blend=blend,
        split="90,10,0",
        path_to_cache=str(tmp_path / "index_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, [64, 8, 0], lambda: True, config).build()


@pytest.fixture
def single_process_group(tmp_path):
    """BlendedDataset asks torch.distributed for its rank: a one-process gloo group."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_gpt_dataset_over_a_weighted_blend_trains_a_model(tmp_path, prepared, sp, single_process_group):
    blend = describe_blend(prepared, [3, 1])
    assert blend["weights"] == [0.75, 0.25] and blend["eod_id"] == sp.eos_id()
    train, valid, _ = _gpt_datasets(tmp_path, (blend["prefixes"], blend["weights"]), blend["eod_id"], blend["pad_id"])
    assert len(train) >= 64 and len(valid) >= 8
    batch = torch.stack([train[i]["tokens"] for i in range(8)])
    labels = torch.stack([train[i]["labels"] for i in range(8)])
    assert batch.shape == (8, 32) and int(batch.max()) < 500

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(500, 16), torch.nn.Linear(16, 500))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(batch).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_blend_refuses_datasets_of_different_tokenizers(tmp_path, prepared, documents):
    other_dir = tmp_path / "other_tokenizer"
    assert main(["train-tokenizer", "--input", str(tmp_path / "code.jsonl"), "--vocab-size", "450", "--output", str(other_dir)]) == 0
    corpus = write_jsonl(tmp_path / "x.jsonl", documents[:5])
    main(["tokenize", "--input", corpus, "--tokenizer", str(other_dir), "--output-prefix", str(tmp_path / "x")])
    with pytest.raises(InputError, match="re-tokenize"):
        describe_blend([prepared[0], str(tmp_path / "x")], [1, 1])


def test_blend_command_writes_megatron_blend(tmp_path, prepared, capsys):
    import json

    assert main(["blend", "--datasets", *prepared, "--weights", "1", "1", "--output", str(tmp_path / "blend.json")]) == 0
    with open(tmp_path / "blend.json") as f:
        written = json.load(f)
    assert written["prefixes"] == prepared and written["weights"] == [0.5, 0.5]
    assert "megatron blend" in capsys.readouterr().out
