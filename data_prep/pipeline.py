"""The tokenize pipeline: input files -> worker processes -> indexed datasets, in input order.

The main process cuts files into blocks of whole lines and hands them to a pool; each worker parses
its block and encodes all its documents in one batch, and sends back one token array and the document
lengths (no per-document pickling). Results are taken in submission order, with a bounded number in
flight, so documents keep their input order whatever the worker count and memory stays flat.
"""

import multiprocessing
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from data_prep.atomic_files import remove_if_exists, write_json
from data_prep.indexed_writer import IndexedDatasetWriter, dataset_files
from data_prep.inputs import FIRST_LINES_KEPT, InputError, InputFile, input_name, parse_block, read_blocks
from data_prep.progress import Progress
from data_prep.tokenizers import DocumentEncoder, TokenizerInfo

BLOCK_BYTES = 1 << 20
METADATA_VERSION = 1


@dataclass
class OutputGroup:
    """Input files that go into one dataset, or one per split ({"train": prefix, "valid": prefix})."""

    files: list[InputFile]
    prefixes: dict[str, str]


@dataclass
class TokenizeSettings:
    tokenizer: TokenizerInfo
    json_key: str = "text"
    text_document: str = "line"  # "line" or "file": what one document of a text file is
    valid_fraction: float = 0.0
    split_seed: int = 1234
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    resume: bool = False


@dataclass
class Totals:
    documents: Counter = field(default_factory=Counter)  # split -> documents written
    tokens: Counter = field(default_factory=Counter)
    empty: int = 0
    skipped: dict = field(default_factory=dict)  # path -> {reason: count}
    first_skipped_lines: dict = field(default_factory=dict)  # path -> {reason: [line numbers]}
    skipped_groups: list = field(default_factory=list)  # outputs already complete (--resume)
    written: dict = field(default_factory=dict)  # prefix -> (documents, tokens)
    notes: list = field(default_factory=list)  # what the user should know about the outputs


def plan_outputs(files: list[InputFile], prefix: str, per_input: bool, valid_fraction: float) -> list[OutputGroup]:
    """One dataset for all inputs, or one per input file (PREFIX_<name>); with a valid split, _train/_valid."""
    splits = ["train", "valid"] if valid_fraction > 0 else [None]

    def prefixes(base):
        return {split or "all": f"{base}_{split}" if split else base for split in splits}

    if not per_input:
        return [OutputGroup(files, prefixes(prefix))]
    names = [input_name(f) for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"several inputs are named {repeated[0]!r}; one output per input needs distinct file names")
    return [OutputGroup([f], prefixes(f"{prefix}_{name}")) for f, name in zip(files, names)]


def is_complete(group: OutputGroup) -> bool:
    return all(os.path.exists(p) for prefix in group.prefixes.values() for p in dataset_files(prefix))


def check_outputs(groups: list[OutputGroup], overwrite: bool, resume: bool):
    """Refuse to replace existing outputs unless asked: --overwrite replaces all, --resume keeps the
    complete ones and redoes the rest."""
    if overwrite or resume:
        return
    for group in groups:
        for prefix in group.prefixes.values():
            existing = [p for p in dataset_files(prefix) if os.path.exists(p)]
            if existing:
                raise InputError(
                    f"output {existing[0]} already exists: pass --overwrite to replace it, --resume to keep"
                    " complete outputs, or choose another --output-prefix"
                )


def tokenize(groups: list[OutputGroup], settings: TokenizeSettings) -> Totals:
    """Write every group's datasets; prints progress and returns the totals."""
    check_outputs(groups, settings.overwrite, settings.resume)
    all_files = [f for g in groups for f in g.files]
    progress = Progress(sum(f.size for f in all_files))
    totals = Totals()
    with _Workers(settings) as workers:
        for group in groups:
            if settings.resume and is_complete(group):
                totals.skipped_groups.append(group)
                progress.skip_bytes(sum(f.size for f in group.files))
                continue
            _tokenize_group(group, settings, workers, progress, totals)
    progress.done()
    return totals


def _tokenize_group(group: OutputGroup, settings: TokenizeSettings, workers, progress: Progress, totals: Totals):
    for prefix in group.prefixes.values():  # a replaced dataset must not look complete midway
        remove_if_exists(prefix + ".json")
    dtype = settings.tokenizer.token_dtype()
    writers = {split: IndexedDatasetWriter(prefix, dtype) for split, prefix in group.prefixes.items()}
    try:
        documents_seen = 0
        bytes_before = {f.path: 0 for f in group.files}
        held = None  # the newest block with documents, split but not yet written: see _split_both_ways
        for block, result in workers.map(_blocks(group.files, settings)):
            tokens, lengths, parsed = result
            _count_skips(block.file.path, parsed, totals)
            if "all" in writers:
                writers["all"].add_documents(tokens, lengths)
            elif len(lengths):
                if held is not None:
                    _write_split(writers, *held)
                valid = is_valid_document(documents_seen + np.arange(len(lengths)), settings.valid_fraction, settings.split_seed)
                held = (tokens, lengths, valid)
            documents_seen += len(lengths)
            progress.update(len(lengths), int(tokens.size), block.file_offset - bytes_before[block.file.path])
            bytes_before[block.file.path] = block.file_offset
        if "all" not in writers:
            note = _split_both_ways(writers, held, documents_seen, settings.valid_fraction)
            if note:
                totals.notes.append(note)
            _write_split(writers, *held)
        for writer in writers.values():
            writer.finish()
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    for split, writer in writers.items():
        totals.documents[split] += writer.documents
        totals.tokens[split] += writer.tokens
        totals.written[writer.prefix] = (writer.documents, writer.tokens)
        write_json(writer.prefix + ".json", _metadata(writer, split, group, settings, totals))


def _write_split(writers: dict, tokens: np.ndarray, lengths: np.ndarray, valid: np.ndarray):
    token_is_valid = np.repeat(valid, lengths)
    writers["train"].add_documents(tokens[~token_is_valid], lengths[~valid])
    writers["valid"].add_documents(tokens[token_is_valid], lengths[valid])


def _split_both_ways(writers: dict, held, documents: int, fraction: float):
    """Neither split may end empty (a small corpus or fraction can draw no validation document, and
    an empty dataset cannot be trained or validated on): the last document, still held back, moves
    to the empty split. Returns a note saying so, or None; refuses a corpus of fewer than 2 documents."""
    if documents < 2:
        raise InputError(
            f"--valid-fraction {fraction:g} splits documents into train and valid, but the input has {documents}"
            " document(s): add documents, or leave out --valid-fraction"
        )
    _, _, valid = held
    counts = {"train": writers["train"].documents + int((~valid).sum()), "valid": writers["valid"].documents + int(valid.sum())}
    empty = [split for split, count in counts.items() if count == 0]
    if not empty:
        return None
    valid[-1] = empty[0] == "valid"
    return f"--valid-fraction {fraction:g} drew no {empty[0]} document of {documents}; the last document went to {empty[0]}"


def is_valid_document(document_numbers: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each document (by its number in the output) goes to validation: a seeded hash, so the
    split depends only on the document's position, not on workers or block sizes."""
    with np.errstate(over="ignore"):
        z = document_numbers.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _count_skips(path: str, parsed, totals: Totals):
    totals.empty += parsed.empty
    if parsed.skipped:
        counts = totals.skipped.setdefault(path, Counter())
        counts.update(parsed.skipped)
        lines = totals.first_skipped_lines.setdefault(path, {})
        for reason, numbers in parsed.first_skipped_lines.items():
            kept = lines.setdefault(reason, [])
            kept += numbers[: FIRST_LINES_KEPT - len(kept)]


def _metadata(writer: IndexedDatasetWriter, split: str, group: OutputGroup, settings: TokenizeSettings, totals: Totals) -> dict:
    tokenizer = settings.tokenizer
    return {
        "version": METADATA_VERSION,
        "prefix": os.path.abspath(writer.prefix),
        "split": split,
        "documents": writer.documents,
        "tokens": writer.tokens,
        "dtype": np.dtype(writer.dtype).name,
        "tokenizer_model": tokenizer.path,
        "tokenizer_type": tokenizer.kind,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "pad_id": tokenizer.pad_id,
        "valid_fraction": settings.valid_fraction,
        "split_seed": settings.split_seed,
        "inputs": [f.path for f in group.files],
        "json_key": settings.json_key,
        "text_document": settings.text_document,
        "skipped_lines": {p: dict(c) for p, c in totals.skipped.items() if p in {f.path for f in group.files}},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _blocks(files: list[InputFile], settings: TokenizeSettings):
    for file in files:
        yield from read_blocks(file, settings.json_key, settings.text_document, BLOCK_BYTES)


# Worker side: one encoder per process, built once by the pool initializer.
_worker_encoder = None
_worker_settings = None


def _init_worker(settings: TokenizeSettings):
    global _worker_encoder, _worker_settings
    _worker_settings = settings
    _worker_encoder = DocumentEncoder(settings.tokenizer)


def _process_block(block):
    parsed = parse_block(block, _worker_settings.json_key, _worker_settings.strict)
    tokens, lengths = _worker_encoder.encode(parsed.documents)
    block.data = None  # the caller has the block already; do not send its text back
    parsed.documents = []
    return tokens, lengths, parsed


class _Workers:
    """`map(blocks)` yields (block, result) in order; in this process when workers == 1."""

    def __init__(self, settings: TokenizeSettings):
        self.settings = settings
        self.pool = None

    def __enter__(self):
        if self.settings.workers > 1:
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            self.pool = context.Pool(self.settings.workers, _init_worker, (self.settings,))
        else:
            _init_worker(self.settings)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()

    def map(self, blocks):
        if self.pool is None:
            for block in blocks:
                yield block, _process_block(block)
            return
        in_flight = deque()
        for block in blocks:
            in_flight.append((block, self.pool.apply_async(_process_block, (block,))))
            if len(in_flight) >= 4 * self.settings.workers:
                block, result = in_flight.popleft()
                yield block, result.get()
        while in_flight:
            block, result = in_flight.popleft()
            yield block, result.get()
