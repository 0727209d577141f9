import inspect
import json

import pytest

from data_prep.tokenizers import train_sentencepiece

VOCAB_SIZE = 500


def _real_documents() -> list[str]:
    """Real text: pieces of Python source (this machine's json and inspect modules), plus text that
    exercises the edges: other scripts, emoji, control characters, odd whitespace."""
    source = inspect.getsource(json.decoder) + inspect.getsource(inspect)
    lines = source.splitlines(keepends=True)
    documents = ["".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    documents += [
        "Zażółć gęślą jaźń — naïve café, 東京都 and 서울 🚀🔥 done.",
        "  leading spaces, trailing spaces   ",
        "tabs\tand\r\nwindows line ends\r\n",
        "control \x01\x02\x03 characters \x7f and a NUL-free line",
        "   ",
        "x",
        "numbers 1234567890 3.14159 -42",
    ]
    return documents


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return _real_documents()


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, documents) -> str:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece(iter(documents * 3), str(directory), VOCAB_SIZE, "bpe", threads=2)
    return str(directory / "tokenizer.model")


@pytest.fixture(scope="session")
def sp(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=sp_model)


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text}) + "\n")
    return str(path)


def read_dataset(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_tokens(sp, texts) -> list[list[int]]:
    """What every output must hold: the tokenizer's encoding of each non-empty text, then eod."""
    return [sp.encode(t) + [sp.eos_id()] for t in texts if t]


def metadata(prefix) -> dict:
    with open(f"{prefix}.json") as f:
        return json.load(f)
