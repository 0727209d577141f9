import sys
from pathlib import Path

# The one-process megatron world and the error measure of the model tests (tests/model/kla_model_testing.py).
sys.path.insert(0, str(Path(__file__).parents[1] / "model"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Path:
    """A BPE SentencePiece model trained by data_prep on real text."""
    from export_testing import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))
