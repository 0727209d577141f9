"""python -m data_prep tokenize: formats, order, bad lines, outputs, tokenizers."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import zstandard

from conftest import expected_tokens, metadata, read_dataset, write_jsonl
from data_prep import pipeline
from data_prep.cli import main


def tokenize(*args) -> int:
    return main(["tokenize", *map(str, args)])


def test_jsonl_output_is_the_tokenizer_encoding_plus_eod(tmp_path, sp_model, sp, documents):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    assert tokenize("--input", corpus, "--tokenizer", sp_model, "--output-prefix", tmp_path / "out", "--workers", 1) == 0
    assert read_dataset(tmp_path / "out") == expected_tokens(sp, documents)
    meta = metadata(tmp_path / "out")
    assert meta["documents"] == len(documents) and meta["eod_id"] == sp.eos_id() == 2
    assert meta["vocab_size"] == 500 and meta["pad_id"] == 3 and meta["dtype"] == "uint16"
    assert meta["tokenizer_model"] == os.path.abspath(sp_model)


def test_output_is_byte_identical_to_megatron_builder(tmp_path, sp_model, sp, documents):
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    corpus = write_jsonl(tmp_path / "corpus.jsonl", documents)
    tokenize("--input", corpus, "--tokenizer", sp_model, "--output-prefix", tmp_path / "ours", "--workers", 2)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=DType.optimal_dtype(sp.vocab_size()))
    for ids in expected_tokens(sp, documents):
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


@pytest.mark.parametrize("workers", [1, 3])
def test_documents_keep_input_order_across_workers_and_files(tmp_path, sp_model, sp, documents, monkeypatch, workers):
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 512)  # many blocks, finishing out of order
    texts = [f"document {i}: " + documents[i % len(documents)][: 50 + 37 * (i % 11)] for i in range(300)]
    for part in range(3):
        write_jsonl(tmp_path / f"part-{part}.jsonl", texts[part * 100 : (part + 1) * 100])
    args = ("--input", tmp_path / "part-*.jsonl", "--tokenizer", sp_model, "--workers", workers)
    assert tokenize(*args, "--output-prefix", tmp_path / "out") == 0
    assert read_dataset(tmp_path / "out") == expected_tokens(sp, texts)


def test_every_input_format(tmp_path, sp_model, sp, documents):
    texts = [d for d in documents if "\n" not in d and "\r" not in d and d]  # one per line in .txt
    lines = "".join(t + "\n" for t in texts).encode()
    write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "b.txt").write_bytes(lines)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pyarrow.parquet.write_table(pyarrow.table({"text": texts}), tmp_path / "e.parquet", row_group_size=2)
    (tmp_path / "f.txt.gz").write_bytes(gzip.compress(lines[:-1]))  # no newline at the end
    assert tokenize("--input", tmp_path, "--tokenizer", sp_model, "--output-prefix", tmp_path / "out/all") == 0
    assert read_dataset(tmp_path / "out/all") == expected_tokens(sp, texts) * 6


def test_text_files_as_whole_documents_and_crlf_lines(tmp_path, sp_model, sp, documents):
    for i, text in enumerate(documents[:3]):
        (tmp_path / f"doc{i}.py").write_text(text)
    assert tokenize("--input", tmp_path / "*.py", "--input-format", "text", "--text-document", "file",
                    "--tokenizer", sp_model, "--output-prefix", tmp_path / "files") == 0
    assert read_dataset(tmp_path / "files") == expected_tokens(sp, documents[:3])
    (tmp_path / "crlf.txt").write_bytes(b"first line\r\nsecond line\r\n")
    tokenize("--input", tmp_path / "crlf.txt", "--tokenizer", sp_model, "--output-prefix", tmp_path / "crlf")
    assert read_dataset(tmp_path / "crlf") == expected_tokens(sp, ["first line", "second line"])


def test_bad_lines_are_skipped_and_counted(tmp_path, sp_model, sp, capsys):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b"{not json",
        json.dumps({"body": "no text key"}).encode(),
        b'{"text": "bad utf-8 \xff\xfe"}',
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": None}).encode(),
        b"",
        json.dumps({"text": "good two"}).encode(),
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert tokenize("--input", tmp_path / "bad.jsonl", "--tokenizer", sp_model, "--output-prefix", tmp_path / "out") == 0
    assert read_dataset(tmp_path / "out") == expected_tokens(sp, ["good one", "good two"])
    out = capsys.readouterr().out
    assert "dropped 1 empty document" in out
    for reason, line in [("not JSON", 2), ("no 'text' key", 3), ("invalid UTF-8", 4), ("'text' is not a string", 6), ("blank line", 7)]:
        assert f"{reason}: 1 (lines {line})" in out
    assert metadata(tmp_path / "out")["skipped_lines"][str(tmp_path / "bad.jsonl")]["not JSON"] == 1


def test_strict_stops_at_the_first_bad_line_and_leaves_no_output(tmp_path, sp_model, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    code = tokenize("--input", tmp_path / "bad.jsonl", "--tokenizer", sp_model, "--output-prefix", tmp_path / "out", "--strict", "--workers", 2)
    assert code == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: not JSON" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_existing_output_needs_overwrite(tmp_path, sp_model, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["one", "two"])
    args = ("--input", corpus, "--tokenizer", sp_model, "--output-prefix", tmp_path / "out")
    assert tokenize(*args) == 0
    assert tokenize(*args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tokenize(*args, "--overwrite") == 0


def test_interrupted_run_leaves_no_dataset_under_the_final_name(tmp_path, sp_model, documents):
    corpus = write_jsonl(tmp_path / "big.jsonl", documents * 400)
    command = [sys.executable, "-m", "data_prep", "tokenize", "--input", corpus, "--tokenizer", sp_model,
               "--output-prefix", str(tmp_path / "out"), "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(tmp_path / "out.bin.partial") and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.") and not p.endswith(".partial")]


def test_resume_keeps_complete_outputs_per_input(tmp_path, sp_model, sp, capsys):
    write_jsonl(tmp_path / "shard-a.jsonl", ["alpha text", "more alpha"])
    write_jsonl(tmp_path / "shard-b.jsonl", ["beta text"])
    args = ("--input", tmp_path / "shard-*.jsonl", "--tokenizer", sp_model, "--output-prefix", tmp_path / "out/ds", "--one-output-per-input")
    assert tokenize(*args) == 0
    assert read_dataset(tmp_path / "out/ds_shard-a") == expected_tokens(sp, ["alpha text", "more alpha"])
    assert read_dataset(tmp_path / "out/ds_shard-b") == expected_tokens(sp, ["beta text"])
    os.remove(tmp_path / "out/ds_shard-b.json")  # as if the run had died before finishing shard b
    before = os.path.getmtime(tmp_path / "out/ds_shard-a.bin")
    assert tokenize(*args, "--resume") == 0
    assert "kept (already complete)" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "out/ds_shard-a.bin") == before
    assert metadata(tmp_path / "out/ds_shard-b")["documents"] == 1


def test_valid_split_is_by_document_and_independent_of_workers(tmp_path, sp_model, sp):
    texts = [f"document number {i}" for i in range(400)]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        assert tokenize("--input", corpus, "--tokenizer", sp_model, "--output-prefix", prefix, "--valid-fraction", 0.1, "--workers", workers) == 0
    train, valid = read_dataset(tmp_path / "w1_train"), read_dataset(tmp_path / "w1_valid")
    assert (train, valid) == (read_dataset(tmp_path / "w2_train"), read_dataset(tmp_path / "w2_valid"))
    assert 20 <= len(valid) <= 60 and len(train) + len(valid) == 400
    assert sorted(train + valid) == sorted(expected_tokens(sp, texts))
    assert metadata(tmp_path / "w1_valid")["split"] == "valid"


def test_huggingface_tokenizer_json(tmp_path, documents):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(documents, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    corpus = write_jsonl(tmp_path / "c.jsonl", documents)
    assert tokenize("--input", corpus, "--tokenizer", tmp_path / "tokenizer.json", "--output-prefix", tmp_path / "hf", "--workers", 2) == 0
    eod = tokenizer.token_to_id("<|endoftext|>")
    assert read_dataset(tmp_path / "hf") == [tokenizer.encode(d, add_special_tokens=False).ids + [eod] for d in documents if d]
    assert metadata(tmp_path / "hf")["eod_id"] == eod


@pytest.mark.parametrize(
    "inputs, message",
    [
        (["/nonexistent/corpus.jsonl"], "does not exist"),
        (["/tmp/no-such-dir-*/x*.jsonl"], "matches no files"),
        (["{tmp}/data.csv"], "--input-format"),
    ],
)
def test_bad_input_gets_one_clear_message(tmp_path, sp_model, capsys, inputs, message):
    (tmp_path / "data.csv").write_text("a,b\n")
    inputs = [i.format(tmp=tmp_path) for i in inputs]
    assert tokenize("--input", *inputs, "--tokenizer", sp_model, "--output-prefix", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_tokenizer_says_how_to_get_one(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["x"])
    assert tokenize("--input", corpus, "--tokenizer", tmp_path / "none.model", "--output-prefix", tmp_path / "o") == 2
    assert "train-tokenizer" in capsys.readouterr().err


def test_progress_and_summary_lines(tmp_path, sp_model, capsys, monkeypatch):
    from data_prep import progress

    monkeypatch.setattr(progress, "EVERY_SECONDS_LOG", 0.0)  # print at every update
    corpus = write_jsonl(tmp_path / "c.jsonl", ["some text"] * 10)
    tokenize("--input", corpus, "--tokenizer", sp_model, "--output-prefix", tmp_path / "o")
    captured = capsys.readouterr()
    assert "docs" in captured.err and "M/s" in captured.err and "MB/s" in captured.err and "ETA" in captured.err
    assert "10 documents" in captured.out and f"wrote {tmp_path / 'o'}.bin/.idx/.json" in captured.out


def test_a_small_valid_fraction_still_writes_one_valid_document(tmp_path, sp_model, sp, capsys):
    # The README's recipe (--valid-fraction 0.005) on 150 documents draws none by the hash.
    texts = [f"document number {i}" for i in range(150)]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    assert tokenize("--input", corpus, "--tokenizer", sp_model, "--output-prefix", tmp_path / "d", "--valid-fraction", 0.005) == 0
    assert read_dataset(tmp_path / "d_valid") == expected_tokens(sp, texts[-1:])
    assert read_dataset(tmp_path / "d_train") == expected_tokens(sp, texts[:-1])
    out = capsys.readouterr().out
    assert "(valid: 1 document(s)," in out and "(train: 149 document(s)," in out
    assert "note: --valid-fraction 0.005 drew no valid document of 150; the last document went to valid" in out


def test_a_large_valid_fraction_still_leaves_one_train_document(tmp_path, sp_model, sp):
    texts = ["first document", "second document"]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    assert tokenize("--input", corpus, "--tokenizer", sp_model, "--output-prefix", tmp_path / "d", "--valid-fraction", 0.999) == 0
    assert read_dataset(tmp_path / "d_train") == expected_tokens(sp, texts[1:])
    assert read_dataset(tmp_path / "d_valid") == expected_tokens(sp, texts[:1])


def test_one_document_cannot_be_split(tmp_path, sp_model, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["the only document"])
    assert tokenize("--input", corpus, "--tokenizer", sp_model, "--output-prefix", tmp_path / "d", "--valid-fraction", 0.1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the input has 1 document(s): add documents, or leave out --valid-fraction" in err[0]
    assert not list(tmp_path.glob("d_*"))


@pytest.mark.parametrize("command", ["tokenize", "train-tokenizer", "default-corpus"])
def test_an_output_that_cannot_be_written_gets_one_line(tmp_path, sp_model, capsys, command):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["some text"] * 3)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"  # under a file: not writable, even for root
    args = {
        "tokenize": ["--input", corpus, "--tokenizer", sp_model, "--output-prefix", out],
        "train-tokenizer": ["--input", corpus, "--vocab-size", 100, "--output", out],
        "default-corpus": ["--output", out],
    }[command]
    assert main([command, *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"data_prep {command}: error: cannot use {tmp_path / 'a_file'}"), err
