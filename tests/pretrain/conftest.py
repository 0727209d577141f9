import glob
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from pretrain_testing import free_port


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """A real-text dataset in seconds: 60 standard-library modules, a 600-piece SentencePiece model,
    megatron indexed train/valid datasets written by megatron's own builder."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), document_tokens=None)


@pytest.fixture(scope="session")
def short_documents_corpus(tmp_path_factory) -> dict:
    """The same text cut into documents of at most 50 tokens, so every sample of 128 tokens holds EODs."""
    return write_corpus(tmp_path_factory.mktemp("short_documents"), document_tokens=50)


def write_corpus(root: Path, document_tokens) -> dict:
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:60]
    spm.SentencePieceTrainer.train(
        input=files[:10], model_prefix=str(root / "tokenizer"), vocab_size=600, pad_id=3,
        byte_fallback=True, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    prefixes = {}
    for split, docs in (("train", files[:54]), ("valid", files[54:])):
        prefix = str(root / split)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for path in docs:
            ids = sp.encode(Path(path).read_text(encoding="utf-8", errors="replace"))
            step = document_tokens or len(ids)
            for piece in (ids[i:i + step] + [sp.eos_id()] for i in range(0, len(ids), step)):
                builder.add_document(np.array(piece, dtype=np.uint16), [len(piece)])
        builder.finalize(prefix + ".idx")
        prefixes[split] = prefix
    return {"tokenizer": str(root / "tokenizer.model"), **prefixes}


@pytest.fixture
def megatron_rng_on_cpu(monkeypatch):
    """megatron's activation recompute snapshots and restores the CUDA RNG states, which a CPU-only torch has
    not: here the CPU generator's state stands in (nothing in our layers draws random numbers)."""
    import torch
    from megatron.core.tensor_parallel import random

    monkeypatch.setattr(random, "_get_all_rng_states", lambda: (torch.get_rng_state(), None, {}))
    monkeypatch.setattr(random, "_set_all_rng_states", lambda cpu, cuda, tracker: torch.set_rng_state(cpu))


@pytest.fixture
def single_process_world(monkeypatch):
    """A gloo process group of one and megatron's parallel state, for building modules."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
