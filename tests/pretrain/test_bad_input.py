"""Bad input stops at start-up with one message that names the problem and the fix, before any
process group, model or dataset exists."""

from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.train import check_config
from pretrain_testing import ROOT, corpus_overrides, run_pretrain

TINY = str(ROOT / "configs" / "tiny.toml")


def checked(tmp_path, corpus, *overrides, world_size=1):
    config = load_config(TINY, [f'output_dir="{tmp_path / "out"}"', *corpus_overrides(corpus), *overrides])
    return check_config(config, world_size)


def test_the_tiny_config_passes(tmp_path, tiny_corpus):
    model, layout, files = checked(tmp_path, tiny_corpus)
    assert model.mixer == "kla" and files.train.prefixes == [tiny_corpus["train"]]
    assert layout.describe() == "TP 1 PP 1 CP 1 DP 1, ZeRO-1"


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["training.stepz=3"], 1, "unknown config key 'training.stepz'"),
        (["training.steps=many"], 1, "'training.steps' wants an integer, got 'many'"),
        (["model.num_layers=two"], 1, "'model.num_layers' wants an integer, got 'two'"),
        (["model.mixer=mamba"], 1, "'model.mixer' wants one of 'kla', 'gdn', 'attention', got 'mamba'"),
        (["model.kernel_backend=cuda"], 1, "model.kernel_backend must be 'auto', 'torch' or 'triton'"),
        (["model.ffn_hidden_size=0"], 1, "model.ffn_hidden_size must be positive"),
        (["training.lr=fast"], 1, "'training.lr' wants a number, got 'fast'"),
        (["model.heads=3"], 1, "unknown model setting(s) ['heads']"),
        (["model.name=kla-9b"], 1, "unknown model 'kla-9b'"),
        (["parallel.tensor=3"], 3, "the model's 4 heads cannot be split over parallel.tensor=3; choose one of [1, 2, 4]"),
        (["parallel.tensor=2"], 3, "3 process(es) cannot be split into tensor=2"),
        (["parallel.pipeline=2", "parallel.zero_stage=2"], 2, "ZeRO stage 2 shards gradients"),
        (["parallel.zero_stage=3"], 1, "parallel.zero_stage must be 1 or 2"),
        (["parallel.context=2", "data.seq_length=192"], 2, "must split into parallel.context=2 slices of whole 64-token"),
        (["parallel.context=2", "model.mixer=attention"], 2, "softmax-attention layers of attention / hybrid models"),
        (["parallel.pipeline=2", "model.num_layers=3"], 2, "3 layers do not split evenly into 2 pipeline chunks; set "
                                                            "parallel.pipeline_layers, e.g. [2, 1]"),
        (["parallel.pipeline=2", "model.num_layers=3", "parallel.pipeline_layers=[2, 2]"], 2,
         "parallel.pipeline_layers=[2, 2] must give 2 positive layer counts"),
        (["parallel.virtual_pipeline=2"], 1, "interleaves pipeline stages and needs parallel.pipeline > 1"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4", "training.global_batch_size=8",
          "training.micro_batch_size=8"], 2, "needs a multiple of parallel.pipeline=2 micro-batches per step, got 1"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4", "training.global_batch_size=12",
          "training.micro_batch_size=4"], 2, "needs a multiple of parallel.pipeline=2 micro-batches per step, got 3"),
        (["parallel.sequence_parallel=true"], 1, "sequence_parallel splits the sequence between tensor-parallel ranks"),
        (["data.seq_length=0"], 1, "data.seq_length must be positive, got 0"),
        (["data.seq_length=4194304", "training.micro_batch_size=1", "training.global_batch_size=1"], 1,
         "4194304 tokens per micro-batch and rank x the mixer's 584-wide input projection exceed the kernels' 32-bit"),
        (["training.global_batch_size=6", "training.micro_batch_size=4"], 1, "must be a multiple of micro_batch_size"),
        (["training.warmup_steps=500"], 1, "training.warmup_steps=500 must be in [0, training.steps=150); lower it"),
        (["training.lr_decay_style=cosin"], 1, "training.lr_decay_style must be one of cosine, linear"),
        (["training.min_lr=0.1"], 1, "training.min_lr=0.1 must be in [0, training.lr=0.003]"),
        (["data.train_weights=[1.0, 2.0]"], 1, "one positive weight per prefix"),
        (['training.recompute_modules=["mpl"]'], 1, "training.recompute_modules: unknown module(s) ['mpl']; choose from ['mlp']"),
        (['training.recompute_modules="mlp"'], 1, "'training.recompute_modules' wants a list, got 'mlp'"),
        (['training.recompute_modules=["layernorm"]'], 1, "'layernorm' is not offered: megatron-core 0.16.1's norm recompute"),
        (['training.recompute_modules=["core_attn"]'], 1, "'core_attn' is not offered: flash attention keeps only"),
        (["training.recompute=true", 'training.recompute_modules=["mlp"]'], 1,
         "training.recompute=true already recomputes every layer whole; set training.recompute_modules=[]"),
    ],
)
def test_bad_settings_are_named(tmp_path, tiny_corpus, overrides, world_size, message):
    with pytest.raises(ConfigError) as error:
        checked(tmp_path, tiny_corpus, *overrides, world_size=world_size)
    assert message in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU refuses")
@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["parallel.tensor=2", "parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel needs GPUs"),
        (["training.recompute=true"], 1, "training.recompute needs a GPU"),
        (['training.recompute_modules=["mlp"]'], 1, "training.recompute_modules needs a GPU"),
        (["model.kernel_backend=triton"], 1, "model.kernel_backend=triton needs a GPU (or TRITON_INTERPRET=1"),
    ],
)
def test_gpu_only_settings_are_named_on_cpu(tmp_path, tiny_corpus, overrides, world_size, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it for the kernel tests
    with pytest.raises(ConfigError) as error:
        checked(tmp_path, tiny_corpus, *overrides, world_size=world_size)
    assert message in str(error.value)


def test_missing_dataset(tmp_path, tiny_corpus):
    with pytest.raises(ConfigError, match=r"nowhere\.bin does not exist; write it with `python -m data_prep tokenize"):
        checked(tmp_path, tiny_corpus, f'data.train_prefixes=["{tmp_path}/nowhere"]')


def test_no_data_says_how_to_get_some(tmp_path):
    with pytest.raises(ConfigError, match="no data: set data.tokenizer and data.train_prefixes, or data.manifest .*default-corpus"):
        check_config(load_config(TINY, [f'output_dir="{tmp_path}"']), 1)


def test_missing_manifest_says_how_to_make_one(tmp_path, tiny_corpus):
    config = load_config(TINY, [f'data.manifest="{tmp_path}/data/manifest.json"', f'output_dir="{tmp_path}"'])
    with pytest.raises(ConfigError, match="run `python -m data_prep default-corpus"):
        check_config(config, 1)


def _copy_dataset(src: str, dst: Path) -> str:
    for suffix in (".bin", ".idx"):
        dst.with_suffix(suffix).write_bytes(Path(src + suffix).read_bytes())
    return str(dst)


def test_corrupt_index(tmp_path, tiny_corpus):
    prefix = _copy_dataset(tiny_corpus["train"], tmp_path / "broken")
    Path(prefix + ".idx").write_bytes(b"not an index" * 10)
    with pytest.raises(ConfigError, match=r"broken\.idx is corrupt .*re-run data_prep tokenize"):
        checked(tmp_path, tiny_corpus, f'data.train_prefixes=["{prefix}"]')


def _empty_dataset(prefix: Path) -> str:
    """What data_prep wrote for a validation split that drew no document (before it kept one)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16).finalize(f"{prefix}.idx")
    return str(prefix)


def test_empty_dataset_is_named_empty(tmp_path, tiny_corpus):
    prefix = _empty_dataset(tmp_path / "web_valid")
    with pytest.raises(ConfigError, match=r"web_valid is empty \(0 documents\); re-run data_prep tokenize with more input"):
        checked(tmp_path, tiny_corpus, f'data.valid_prefixes=["{prefix}"]')


@pytest.mark.parametrize("broken", ["empty", "corrupt"])
def test_a_bad_dataset_gets_one_line_and_no_tracebacks(tmp_path, tiny_corpus, broken):
    if broken == "empty":
        prefix = _empty_dataset(tmp_path / "web_valid")
    else:
        prefix = _copy_dataset(tiny_corpus["valid"], tmp_path / "web_valid")
        Path(prefix + ".idx").write_bytes(b"not an index" * 10)
    result = run_pretrain(tmp_path / "out", tiny_corpus, f'data.valid_prefixes=["{prefix}"]')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert result.stderr.startswith(f"error: dataset {'' if broken == 'empty' else 'index '}{prefix}")


def test_truncated_bin(tmp_path, tiny_corpus):
    prefix = _copy_dataset(tiny_corpus["train"], tmp_path / "short")
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"short\.bin has \d+ bytes but its \.idx describes \d+"):
        checked(tmp_path, tiny_corpus, f'data.train_prefixes=["{prefix}"]')


def test_missing_tokenizer(tmp_path, tiny_corpus):
    with pytest.raises(ConfigError, match="tokenizer .*nope.model does not exist"):
        checked(tmp_path, tiny_corpus, f'data.tokenizer="{tmp_path}/nope.model"')


def test_unwritable_output_dir(tmp_path, tiny_corpus):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not writable"):
        checked(tmp_path, tiny_corpus, f'output_dir="{blocker}/run"')


def test_the_command_line_prints_one_error_and_exits_2(tmp_path, tiny_corpus):
    result = run_pretrain(tmp_path, tiny_corpus, "parallel.tensor=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 process(es) cannot be split")
    assert "Traceback" not in result.stderr


def test_existing_checkpoints_need_resume(tmp_path, tiny_corpus):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_0000002\n")
    result = run_pretrain(tmp_path, tiny_corpus)
    assert result.returncode == 2 and "pass --resume to continue it" in result.stderr


def test_dataset_written_with_another_tokenizer(tmp_path, tiny_corpus):
    prefix = _copy_dataset(tiny_corpus["train"], tmp_path / "other")
    Path(prefix + ".json").write_text('{"tokenizer_sha256": "0123"}')
    with pytest.raises(ConfigError, match="was tokenized with another tokenizer than data.tokenizer"):
        checked(tmp_path, tiny_corpus, f'data.train_prefixes=["{prefix}"]')
