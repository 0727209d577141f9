"""default-corpus (the embedded stdlib corpus) and train-tokenizer."""

import json
import os
import time

import sentencepiece

from conftest import read_dataset, write_jsonl
from data_prep import default_corpus
from data_prep.cli import main


def test_default_corpus_layout_manifest_and_idempotence(tmp_path, capsys):
    start = time.monotonic()
    assert main(["default-corpus", "--output", str(tmp_path / "corpus"), "--workers", "2"]) == 0
    assert time.monotonic() - start < 90
    with open(tmp_path / "corpus/manifest.json") as f:
        manifest = json.load(f)
    assert manifest["tokenizer_model"] == str(tmp_path / "corpus/tokenizer/tokenizer.model")
    assert manifest["vocab_size"] == 8192 and manifest["eod_id"] == 2 and manifest["pad_id"] == 3
    for split in ("train", "valid"):
        assert manifest[f"{split}_prefix"] == str(tmp_path / f"corpus/{split}")
        assert manifest["documents"][split] > 0 and manifest["tokens"][split] > 0
        assert len(read_dataset(manifest[f"{split}_prefix"])) == manifest["documents"][split]
    assert manifest["documents"]["train"] + manifest["documents"]["valid"] <= len(default_corpus.stdlib_source_files())
    with open(tmp_path / "corpus/tokenizer/tokenizer_meta.json") as f:
        assert json.load(f)["pad_token"] == "<pad>"

    capsys.readouterr()
    start = time.monotonic()
    assert main(["default-corpus", "--output", str(tmp_path / "corpus")]) == 0
    assert time.monotonic() - start < 1 and "already built" in capsys.readouterr().out


def test_default_corpus_files_are_sorted_stdlib_source_without_tests():
    files = default_corpus.stdlib_source_files()
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    assert not any(f"{os.sep}test{os.sep}" in f or "site-packages" in f for f in files)


def test_train_tokenizer_writes_model_with_special_tokens(tmp_path, documents, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents * 3)
    args = ["train-tokenizer", "--input", corpus, "--vocab-size", "420", "--output", str(tmp_path / "tok")]
    assert main(args) == 0
    assert f"wrote {tmp_path / 'tok' / 'tokenizer.model'}" in capsys.readouterr().out
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok/tokenizer.model"))
    assert processor.vocab_size() == 420
    assert [processor.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert processor.pad_id() == 3 and processor.eos_id() == 2
    text = "  def f(x):\n\treturn x  # naïve 東京 🚀\n"
    assert processor.decode(processor.encode(text)) == text  # loss-free: spaces and unicode survive
    assert main(args) == 2  # exists: needs --overwrite
    assert main(args + ["--overwrite", "--model-type", "unigram"]) == 0


def test_train_tokenizer_vocab_too_large_says_what_to_do(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["tiny text"])
    assert main(["train-tokenizer", "--input", corpus, "--vocab-size", "5000", "--output", str(tmp_path / "t")]) == 2
    assert "lower --vocab-size" in capsys.readouterr().err
