import glob
import sysconfig
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """A real-text dataset in seconds: 60 standard-library modules, a 600-piece SentencePiece model,
    megatron indexed train/valid datasets written by megatron's own builder."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("corpus")
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
            ids = sp.encode(Path(path).read_text(encoding="utf-8", errors="replace")) + [sp.eos_id()]
            builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
        builder.finalize(prefix + ".idx")
        prefixes[split] = prefix
    return {"tokenizer": str(root / "tokenizer.model"), **prefixes}


