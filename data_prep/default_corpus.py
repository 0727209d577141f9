"""The embedded default corpus: the Python standard library's own source, on every machine already.

Each .py file under sysconfig's stdlib directory (test suites and site-packages left out) is one
document, in sorted path order, so machines with the same Python build the same corpus. It goes
through the same train-tokenizer and tokenize code as any user corpus, with a document-level
train/valid split. DIR/manifest.json is written last; when it is there, the work is done.
"""

import json
import os
import sysconfig
import time

from data_prep.atomic_files import write_json
from data_prep.indexed_writer import dataset_files
from data_prep.inputs import InputFile, sample_documents
from data_prep.pipeline import OutputGroup, TokenizeSettings, tokenize
from data_prep.tokenizers import load_tokenizer_info, train_sentencepiece

SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
VALID_FRACTION = 0.05
# Enough text for a small vocabulary, little enough to train in seconds on 2 cores.
TOKENIZER_SAMPLE_BYTES = 3_000_000


def stdlib_source_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        found += [os.path.join(directory, name) for name in names if name.endswith(".py")]
    return sorted(found)


def build_default_corpus(output_dir: str, vocab_size: int = 8192, workers: int = 1) -> dict:
    """Build (or find) the default corpus in output_dir; returns its manifest."""
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)  # an output that cannot be written fails here, before any work
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = [manifest["tokenizer_model"]] + [
            path for split in ("train", "valid") for path in dataset_files(manifest[f"{split}_prefix"])
        ]
        if manifest.get("vocab_size") == vocab_size and all(os.path.exists(p) for p in files):
            print(f"default-corpus: already built in {output_dir} ({manifest_path}); nothing to do")
            return manifest
        print(f"default-corpus: {manifest_path} does not match vocab {vocab_size} or its files: rebuilding")
        os.remove(manifest_path)

    start = time.monotonic()
    files = [InputFile(path, "text", None) for path in stdlib_source_files()]
    size = sum(f.size for f in files)
    print(f"default-corpus: {len(files)} standard library files ({size / 1e6:.1f} MB) from {sysconfig.get_paths()['stdlib']}")
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    sample = sample_documents(files, TOKENIZER_SAMPLE_BYTES, "text", "file")
    train_sentencepiece(sample, tokenizer_dir, vocab_size, "bpe")
    tokenizer = load_tokenizer_info(os.path.join(tokenizer_dir, "tokenizer.model"))
    print(f"default-corpus: trained {tokenizer.path} in {time.monotonic() - start:.1f} s")

    prefixes = {"train": os.path.join(output_dir, "train"), "valid": os.path.join(output_dir, "valid")}
    settings = TokenizeSettings(tokenizer, text_document="file", valid_fraction=VALID_FRACTION, workers=workers, overwrite=True)
    totals = tokenize([OutputGroup(files, prefixes)], settings)
    manifest = {
        "tokenizer_model": tokenizer.path,
        "train_prefix": prefixes["train"],
        "valid_prefix": prefixes["valid"],
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "pad_id": tokenizer.pad_id,
        "documents": dict(totals.documents),
        "tokens": dict(totals.tokens),
        "source": sysconfig.get_paths()["stdlib"],
        "files": len(files),
        "bytes": size,
        "valid_fraction": VALID_FRACTION,
        "seconds": round(time.monotonic() - start, 1),
    }
    write_json(manifest_path, manifest)
    print(
        f"default-corpus: train {totals.documents['train']:,} docs / {totals.tokens['train']:,} tokens,"
        f" valid {totals.documents['valid']:,} docs / {totals.tokens['valid']:,} tokens in {manifest['seconds']} s"
    )
    print(f"default-corpus: wrote {prefixes['train']}.bin/.idx, {prefixes['valid']}.bin/.idx, {manifest_path}")
    return manifest
