"""Writes megatron-core indexed datasets (PREFIX.bin + PREFIX.idx), byte-identical to its IndexedDatasetBuilder.

The format (megatron/core/datasets/indexed_dataset.py), one sequence per document:
  .bin  every document's tokens, back to back, in the dtype (uint16 below 65500 ids, else int32)
  .idx  b"MMIDIDX\\x00\\x00", version <Q 1, dtype code <B (uint16 8, int32 4), sequence count <Q,
        document count + 1 <Q, lengths int32[n], byte pointers int64[n], document indices int64[0..n]

Tokens go to PREFIX.bin.partial in one write per batch; lengths to a side file, so memory stays flat
however many documents there are; `finish` writes the .idx from them. Nothing appears under the final
names until `commit`, so an interrupted run leaves no half-written dataset.
"""

import os
import struct

import numpy as np

from data_prep.atomic_files import PARTIAL_SUFFIX, remove_if_exists

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
_CHUNK = 1 << 22  # documents per chunk when writing the index


def dataset_files(prefix: str) -> list[str]:
    """The files a complete dataset has; the metadata json is written last and marks completion."""
    return [prefix + ".bin", prefix + ".idx", prefix + ".json"]


class IndexedDatasetWriter:
    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin_path = prefix + ".bin" + PARTIAL_SUFFIX
        self._idx_path = prefix + ".idx" + PARTIAL_SUFFIX
        self._lengths_path = prefix + ".lengths" + PARTIAL_SUFFIX
        self._bin = open(self._bin_path, "wb")
        self._lengths = open(self._lengths_path, "wb")

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray):
        """Append documents: their tokens back to back, and each one's token count."""
        self._bin.write(np.ascontiguousarray(tokens, self.dtype).data)
        self._lengths.write(np.ascontiguousarray(lengths, np.int32).data)
        self.documents += len(lengths)
        self.tokens += int(tokens.size)

    def finish(self):
        """Close the .bin and write the .idx, still under temporary names."""
        self._bin.close()
        self._lengths.close()
        n = self.documents
        with open(self._idx_path, "wb") as idx:
            idx.write(_INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", n))
            idx.write(struct.pack("<Q", n + 1))
            for lengths in self._length_chunks():
                idx.write(lengths.data)
            pointer = 0
            for lengths in self._length_chunks():
                ends = pointer + np.cumsum(lengths, dtype=np.int64) * self.dtype.itemsize
                idx.write(np.concatenate([[pointer], ends[:-1]]).astype(np.int64).data)
                pointer = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):
                idx.write(np.arange(start, min(start + _CHUNK, n + 1), dtype=np.int64).data)
        remove_if_exists(self._lengths_path)

    def _length_chunks(self):
        with open(self._lengths_path, "rb") as f:
            while chunk := f.read(_CHUNK * 4):
                yield np.frombuffer(chunk, np.int32)

    def commit(self):
        """Move the finished files to their final names."""
        os.replace(self._bin_path, self.prefix + ".bin")
        os.replace(self._idx_path, self.prefix + ".idx")

    def discard(self):
        """Remove everything this writer wrote (after an error or interruption)."""
        for f in (self._bin, self._lengths):
            f.close()
        for path in (self._bin_path, self._idx_path, self._lengths_path):
            remove_if_exists(path)
