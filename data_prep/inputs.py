"""Input files: expand paths and globs, recognise formats, stream documents out of them.

Formats, told by the file name (or forced with --input-format):
  .jsonl .json .ndjson   one JSON object per line, the text under `json_key` (default "text")
  .txt .text             plain UTF-8 text: one document per line, or the whole file with text_document="file"
  .parquet               a string column named `json_key`
JSONL and text may be compressed: a further .gz or .zst suffix.

The work is split so that the workers do it: the main process only cuts files into `Block`s of whole
lines (a few MB, no parsing); `parse_block`, run in a worker, turns a block into documents (UTF-8 bytes)
and skips and counts the bad lines.
"""

import glob
import gzip
import os
from collections import Counter
from dataclasses import dataclass, field

import orjson

FORMATS = ("jsonl", "text", "parquet")
_FORMAT_OF_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".text": "text", ".parquet": "parquet"}
_COMPRESSION_OF_SUFFIX = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Lines numbers kept per file and reason for the summary.
FIRST_LINES_KEPT = 5


class InputError(ValueError):
    """Bad input named by the user: the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # one of FORMATS
    compression: str | None  # "gzip", "zstd" or None

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)


@dataclass
class Block:
    """Whole lines (or one whole file, or a batch of Parquet rows) of one input file."""

    file: InputFile
    first_line: int  # 1-based number of the block's first line (or row)
    data: object  # bytes, or a pyarrow string array for Parquet
    file_offset: int  # bytes of the file on disk read once this block is done (for progress)
    whole_file: bool = False  # the block is one document (text files read with text_document="file")


@dataclass
class ParsedBlock:
    documents: list[bytes]
    empty: int = 0  # documents with no text, dropped
    skipped: Counter = field(default_factory=Counter)  # reason -> bad lines skipped
    first_skipped_lines: dict = field(default_factory=dict)  # reason -> first few line numbers


class BadLineError(InputError):
    pass


def resolve_inputs(patterns: list[str], input_format: str = "auto") -> list[InputFile]:
    """The input files named by paths, globs and directories, in the order given, each once."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"--input {pattern!r} matches no files: check the pattern and the directory")
            paths += matches
        elif os.path.isdir(pattern):
            matches = sorted(
                os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names if _known_format(name)
            )
            if not matches:
                raise InputError(f"directory {pattern} holds no .jsonl/.json/.txt/.parquet files (optionally .gz/.zst)")
            paths += matches
        elif not os.path.exists(pattern):
            raise InputError(f"input {pattern} does not exist: check the path")
        else:
            paths.append(pattern)
    unique_paths = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    return [_describe(path, input_format) for path in unique_paths]


def _known_format(name: str) -> bool:
    stem, suffix = os.path.splitext(name)
    if suffix in _COMPRESSION_OF_SUFFIX:
        suffix = os.path.splitext(stem)[1]
    return suffix in _FORMAT_OF_SUFFIX


def _describe(path: str, input_format: str) -> InputFile:
    stem, suffix = os.path.splitext(path)
    compression = _COMPRESSION_OF_SUFFIX.get(suffix)
    if compression:
        suffix = os.path.splitext(stem)[1]
    file_format = input_format if input_format != "auto" else _FORMAT_OF_SUFFIX.get(suffix)
    if file_format is None:
        raise InputError(
            f"cannot tell the format of {path} from its name: name it .jsonl/.txt/.parquet "
            "(optionally .gz/.zst) or pass --input-format jsonl|text|parquet"
        )
    if file_format == "parquet" and compression:
        raise InputError(f"{path}: Parquet compresses itself; give the .parquet file uncompressed")
    return InputFile(path, file_format, compression)


def input_name(file: InputFile) -> str:
    """File name without directory, format and compression suffixes: names per-input outputs."""
    name = os.path.basename(file.path)
    for _ in range(2):
        stem, suffix = os.path.splitext(name)
        if suffix in _COMPRESSION_OF_SUFFIX or suffix in _FORMAT_OF_SUFFIX:
            name = stem
    return name


def read_blocks(file: InputFile, json_key: str, text_document: str, block_bytes: int):
    """Blocks of the file, in order. Only splits the bytes; parsing happens in `parse_block`."""
    if file.format == "parquet":
        yield from _parquet_blocks(file, json_key, block_bytes)
        return
    with open(file.path, "rb") as raw:
        stream = _decompressed(raw, file.compression)
        if file.format == "text" and text_document == "file":
            yield Block(file, 1, stream.read(), raw.tell(), whole_file=True)
            return
        line = 1
        rest = b""
        while True:
            chunk = stream.read(block_bytes)
            if not chunk:
                break
            data = rest + chunk
            cut = data.rfind(b"\n") + 1  # blocks end after a newline, so lines stay whole
            if cut == 0:
                rest = data
                continue
            yield Block(file, line, data[:cut], raw.tell())
            line += data.count(b"\n", 0, cut)
            rest = data[cut:]
        if rest:
            yield Block(file, line, rest, raw.tell())


def _decompressed(raw, compression: str | None):
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _parquet_blocks(file: InputFile, column: str, block_bytes: int):
    import pyarrow.parquet

    parquet = pyarrow.parquet.ParquetFile(file.path)
    if column not in parquet.schema_arrow.names:
        raise InputError(
            f"{file.path} has no column {column!r} (columns: {', '.join(parquet.schema_arrow.names)}): pass --json-key NAME"
        )
    rows = parquet.metadata.num_rows
    row = 1
    # Rows per batch from the average stored size, so blocks are about block_bytes of text.
    batch_rows = max(1, int(block_bytes * rows / max(file.size, 1)))
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
        row_end = row + batch.num_rows
        yield Block(file, row, batch.column(0), int(file.size * (row_end - 1) / max(rows, 1)))
        row = row_end


def parse_block(block: Block, json_key: str, strict: bool) -> ParsedBlock:
    """The block's documents as UTF-8 bytes; bad lines are skipped and counted (or raise if strict)."""
    parsed = ParsedBlock([])

    def skip(line: int, reason: str):
        if strict:
            raise BadLineError(
                f"{block.file.path}:{line}: {reason}. Fix the input, or run without --strict to skip and count such lines"
            )
        parsed.skipped[reason] += 1
        kept = parsed.first_skipped_lines.setdefault(reason, [])
        if len(kept) < FIRST_LINES_KEPT:
            kept.append(line)

    def add(line: int, text: bytes):
        if text:
            parsed.documents.append(text)
        else:
            parsed.empty += 1

    if block.file.format == "parquet":
        for row, value in enumerate(block.data.to_pylist(), start=block.first_line):
            if value is None:
                skip(row, f"null {json_key!r}")
            else:
                add(row, value.encode())
    elif block.file.format == "text":
        _parse_text(block, add, skip)
    else:
        _parse_jsonl(block, json_key, add, skip)
    return parsed


def _parse_text(block: Block, add, skip):
    data = block.data
    try:
        data.decode()
        first_bad_line = None
    except UnicodeDecodeError as error:
        first_bad_line = block.first_line + data.count(b"\n", 0, error.start)
    if block.whole_file:
        if first_bad_line is None:
            add(block.first_line, data)
        else:
            skip(first_bad_line, "invalid UTF-8")
        return
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=block.first_line):
        line = line[:-1] if line.endswith(b"\r") else line
        if first_bad_line is not None and number >= first_bad_line and not _is_utf8(line):
            skip(number, "invalid UTF-8")
        else:
            add(number, line)


def _parse_jsonl(block: Block, json_key: str, add, skip):
    lines = block.data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=block.first_line):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            if not line.strip():
                skip(number, "blank line")
            else:
                skip(number, "not JSON" if _is_utf8(line) else "invalid UTF-8")
            continue
        if not isinstance(record, dict) or json_key not in record:
            skip(number, f"no {json_key!r} key")
            continue
        text = record[json_key]
        if not isinstance(text, str):
            skip(number, f"{json_key!r} is not a string")
            continue
        try:
            add(number, text.encode())
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            skip(number, "invalid UTF-8")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def sample_documents(files: list[InputFile], budget_bytes: int, json_key: str, text_document: str):
    """Documents (str) for tokenizer training: from the start of every file, each file's share of the
    budget in proportion to its size, so huge inputs are sampled across all shards without a full pass."""
    total = sum(f.size for f in files) or 1
    for file in files:
        share = budget_bytes * file.size / total
        taken = 0
        for block in read_blocks(file, json_key, text_document, block_bytes=min(1 << 20, int(share) + 1)):
            for document in parse_block(block, json_key, strict=False).documents:
                yield document.decode()
                taken += len(document)
                if taken >= share:
                    break
            if taken >= share:
                break
