"""Exact SentencePiece encoding through a cache of short text pieces: the fast path of `tokenize`.

`SentencePieceProcessor.encode(text)` spends its time running BPE over the whole text.
Real text repeats itself, so we cut each document where no vocabulary piece can reach across, look the
short parts up in a cache, and run SentencePiece only on the parts it has not seen (one call for all of
them). The result is the same token ids, byte for byte; the tests and bench/data_prep.py check that.

Why cutting is exact (for BPE). Every token SentencePiece emits is a vocabulary piece, or with byte
fallback one byte of a character that no piece holds. If no piece contains the byte pair (a, b), no
token can cover both sides of a boundary between a and b: BPE only merges neighbours into vocabulary
pieces, in order of score and then position, so the merges on each side are the ones that side makes
alone, and the document's encoding is the concatenation of its parts' encodings. That also needs a
normalizer that does nothing but turn spaces into U+2581 and put one in front of the text ("identity"
rules without whitespace collapsing, as in Llama's models and ours), and byte fallback (without it,
runs of unknown characters merge into one <unk> across boundaries). `CachedSentencePieceEncoder.supports`
checks these; other models, unigram ones too (their ties between equally scored segmentations are
broken by float rounding of scores summed across the text), take the plain path.

Why joining the misses is exact. The parts that miss the cache are joined with a control character
that no piece holds: it can merge with nothing, and comes out as exactly one byte-fallback token that
no other character produces, so the joint encoding splits back into the parts' encodings.
"""

import numpy as np
from sentencepiece import sentencepiece_model_pb2

# Parts up to this many bytes are cached (keyed by their bytes, two uint64 words), longer ones are
# encoded every time: they are rare and rarely repeat.
MAX_CACHED_BYTES = 16
# Cached parts that encode to more tokens than this (byte-fallback heavy text) are not cached.
MAX_CACHED_TOKENS = 8
# Parts encoded by one SentencePiece call: long enough to amortise the call, short enough for BPE.
PARTS_PER_CALL = 4096
_NORMAL_PIECE_TYPES = (
    sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL,
    sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
    sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED,
)
# _LOW_BYTES_MASK[n] keeps the first n bytes of a little-endian uint64.
_LOW_BYTES_MASK = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], np.uint64)
_HASH_MULTIPLIERS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9))


class CachedSentencePieceEncoder:
    """Encodes documents (UTF-8 bytes) to the ids `processor.encode` gives, each followed by `eod_id`."""

    def __init__(self, processor, model_proto, eod_id: int, cache_bits: int = 20):
        self.processor = processor
        self.eod_id = eod_id
        self.text_prefix = b" " if model_proto.normalizer_spec.add_dummy_prefix else b""
        self.joinable = _joinable_byte_pairs(model_proto)
        self.separators = _separator_candidates(model_proto)
        self.cache_bits = cache_bits
        slots = 1 << cache_bits
        self.slot_key = np.zeros((slots, 2), np.uint64)
        self.slot_bytes = np.full(slots, -1, np.int16)  # -1: empty slot
        self.slot_token_count = np.zeros(slots, np.int16)
        self.slot_tokens = np.zeros((slots, MAX_CACHED_TOKENS), np.int32)

    @staticmethod
    def supports(model_proto) -> str | None:
        """None if the cache is exact for this model, else the reason it is not."""
        normalizer = model_proto.normalizer_spec
        trainer = model_proto.trainer_spec
        if trainer.model_type != trainer.BPE:
            # Unigram ties between equally scored paths are broken by float rounding of path scores
            # summed from the start of the text, so cutting the text can change them.
            return "not a BPE model"
        if normalizer.precompiled_charsmap or normalizer.name not in ("identity", ""):
            return f"normalization rule {normalizer.name!r} rewrites text"
        if normalizer.remove_extra_whitespaces:
            return "the normalizer collapses whitespace"
        if not normalizer.escape_whitespaces or trainer.treat_whitespace_as_suffix:
            return "whitespace is not escaped as a prefix"
        if not trainer.byte_fallback:
            return "no byte fallback"
        if not _separator_candidates(model_proto):
            return "every control character is in some piece"
        return None

    def encode(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all documents, each followed by eod (int32), and each document's token count."""
        text = b"".join(self.text_prefix + document for document in documents)
        separator = next((s for s in self.separators if s[0] not in text), None)
        if separator is None:  # the text uses every candidate separator: encode it the plain way
            return self._encode_plain(documents)
        doc_starts = np.cumsum([0] + [len(self.text_prefix) + len(d) for d in documents[:-1]])
        part_starts, part_lengths = self._cut(text, doc_starts)
        located = self._locate_tokens(text, part_starts, part_lengths, separator)
        if located is None:
            return self._encode_plain(documents)
        source, source_start, count = located

        # One end-of-document pseudo-part (the last entry of `source`) after each document.
        part_first = np.searchsorted(part_starts, doc_starts)
        doc_ends = np.append(part_first[1:], len(part_starts))
        source_start = np.insert(source_start, doc_ends, len(source) - 1)
        count = np.insert(count, doc_ends, 1)
        doc_token_counts = np.add.reduceat(count, part_first + np.arange(len(documents)))

        out_start = np.cumsum(count) - count
        gather = np.repeat(source_start - out_start, count) + np.arange(int(count.sum()))
        return source[gather], doc_token_counts

    def _locate_tokens(self, text, part_starts, part_lengths, separator):
        """(source, start, count): part i's tokens are source[start[i]:start[i] + count[i]]; eod last."""
        short_index = np.flatnonzero(part_lengths <= MAX_CACHED_BYTES)
        lengths = part_lengths[short_index]
        keys = self._keys(text, part_starts[short_index], lengths)
        hashes = self._hash(keys, lengths)
        slots = (hashes >> np.uint64(64 - self.cache_bits)).astype(np.int64)
        hit = (
            (self.slot_bytes[slots] == lengths)
            & (self.slot_key[slots, 0] == keys[:, 0])
            & (self.slot_key[slots, 1] == keys[:, 1])
        )
        # Distinct missing parts, found by hash and confirmed by their bytes; a part whose hash
        # collides with another's is encoded on its own, like the long parts.
        miss = np.flatnonzero(~hit)
        _, first, group = np.unique(hashes[miss], return_index=True, return_inverse=True)
        group = group.reshape(-1)
        distinct = miss[first]
        same = (keys[distinct[group]] == keys[miss]).all(axis=1) & (lengths[distinct[group]] == lengths[miss])
        grouped, group = miss[same], group[same]
        uncached = np.concatenate([short_index[miss[~same]], np.flatnonzero(part_lengths > MAX_CACHED_BYTES)])
        fresh = np.concatenate([short_index[distinct], uncached])
        encoded = self._encode_parts(text, part_starts[fresh], part_lengths[fresh], separator)
        if encoded is None:
            return None
        fresh_tokens, fresh_counts = encoded
        fresh_starts = np.cumsum(fresh_counts) - fresh_counts

        hit_slots = slots[hit]
        hit_counts = self.slot_token_count[hit_slots].astype(np.int64)
        hit_tokens = self.slot_tokens[hit_slots][np.arange(MAX_CACHED_TOKENS) < hit_counts[:, None]]
        source = np.concatenate([hit_tokens, fresh_tokens, [self.eod_id]]).astype(np.int32)

        start = np.empty(len(part_starts), np.int64)
        count = np.empty(len(part_starts), np.int64)
        start[short_index[hit]] = np.cumsum(hit_counts) - hit_counts
        count[short_index[hit]] = hit_counts
        start[short_index[grouped]] = len(hit_tokens) + fresh_starts[group]
        count[short_index[grouped]] = fresh_counts[group]
        n = len(distinct)
        start[uncached] = len(hit_tokens) + fresh_starts[n:]
        count[uncached] = fresh_counts[n:]
        # Stored only now: a new part may take the slot of a hit read above.
        self._store(slots[distinct], keys[distinct], lengths[distinct], fresh_tokens, fresh_starts[:n], fresh_counts[:n])
        return source, start, count

    def _cut(self, text: bytes, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start and length of each part: cut between bytes no piece joins, and at document starts."""
        data = np.frombuffer(text, np.uint8)
        is_start = np.zeros(len(data), bool)
        is_start[1:] = ~self.joinable[data[:-1], data[1:]]
        is_start[doc_starts] = True
        starts = np.flatnonzero(is_start)
        return starts, np.diff(starts, append=len(data))

    @staticmethod
    def _keys(text: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Each short part's bytes, zero padded to 16, as two little-endian uint64 words."""
        padded = np.frombuffer(text + bytes(MAX_CACHED_BYTES), np.uint8)
        # A uint64 view starting at every byte offset: two reads give a part's 16 bytes.
        words = np.ndarray((len(text) + 8,), "<u8", padded, strides=(1,))
        low = words[starts] & _LOW_BYTES_MASK[np.minimum(lengths, 8)]
        high = words[starts + 8] & _LOW_BYTES_MASK[np.maximum(lengths - 8, 0)]
        return np.column_stack([low, high])

    @staticmethod
    def _hash(keys: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        m0, m1, m2 = _HASH_MULTIPLIERS
        return (keys[:, 0] * m0) ^ (keys[:, 1] * m1) ^ (lengths.astype(np.uint64) * m2)

    def _encode_parts(self, text: bytes, starts, lengths, separator: bytes):
        """SentencePiece encodings of the given parts: (all tokens, token count per part), or None."""
        separator_char, separator_id = separator
        view = memoryview(text)
        pieces = [view[s : s + n].tobytes() for s, n in zip(starts.tolist(), lengths.tolist())]
        # Each call's text starts with the separator, so the model's leading space (if any) lands
        # in a part we drop, and every real part begins right after a separator.
        calls = [
            separator_char + separator_char.join(pieces[i : i + PARTS_PER_CALL])
            for i in range(0, len(pieces), PARTS_PER_CALL)
        ]
        tokens, counts = [], []
        for ids in self.processor.encode(calls, out_type="numpy", num_threads=1):
            marks = np.flatnonzero(ids == separator_id)
            ends = np.append(marks[1:], len(ids))
            counts.append(ends - marks - 1)
            kept = ids[marks[0] :]
            tokens.append(kept[kept != separator_id])
        counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        if len(counts) != len(pieces):  # a separator merged after all: never seen; stay exact anyway
            return None
        tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        return tokens, counts

    def _store(self, slots, keys, lengths, tokens, starts, counts):
        """Put freshly encoded short parts in their slots (one part per slot, the others wait)."""
        keep = counts <= MAX_CACHED_TOKENS
        slots, keys, lengths, starts, counts = slots[keep], keys[keep], lengths[keep], starts[keep], counts[keep]
        slots, first = np.unique(slots, return_index=True)  # all fields of a slot from the same part
        keys, lengths, starts, counts = keys[first], lengths[first], starts[first], counts[first]
        offsets = np.arange(MAX_CACHED_TOKENS)
        padded_tokens = np.append(tokens, 0)
        self.slot_tokens[slots] = np.where(
            offsets < counts[:, None], padded_tokens[np.minimum(starts[:, None] + offsets, len(tokens))], 0
        )
        self.slot_key[slots] = keys
        self.slot_bytes[slots] = lengths
        self.slot_token_count[slots] = counts

    def _encode_plain(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.processor.encode(documents, out_type="numpy", num_threads=1)
        with_eod = [np.append(ids, self.eod_id) for ids in encoded]
        return np.concatenate(with_eod).astype(np.int32), np.array([len(ids) for ids in with_eod], np.int64)


def _joinable_byte_pairs(model_proto) -> np.ndarray:
    """joinable[a, b]: some piece holds a character ending in byte a followed by one starting with b.

    U+2581 in a piece stands for a space, and for a literal U+2581 in the text (SentencePiece does not
    tell them apart), so both spellings count.
    """
    spellings = {"\u2581": (" ", "\u2581")}
    pairs = set()
    for piece in model_proto.pieces:
        if piece.type in _NORMAL_PIECE_TYPES:
            for left, right in zip(piece.piece, piece.piece[1:]):
                for a in spellings.get(left, (left,)):
                    for b in spellings.get(right, (right,)):
                        pairs.add((a.encode()[-1], b.encode()[0]))
    joinable = np.zeros((256, 256), bool)
    if pairs:
        first, second = zip(*pairs)
        joinable[list(first), list(second)] = True
    joinable[:, 0x80:0xC0] = True  # never cut inside a UTF-8 character
    return joinable


def _separator_candidates(model_proto) -> list[tuple[bytes, int]]:
    """(character, byte-fallback id) of the control characters that no piece holds."""
    in_pieces = set()
    for piece in model_proto.pieces:
        if piece.type in _NORMAL_PIECE_TYPES:
            in_pieces.update(piece.piece.encode())
    byte_ids = {p.piece: i for i, p in enumerate(model_proto.pieces) if p.type == p.BYTE}
    control = [c for c in range(1, 32) if c not in (9, 10, 13)] + [0x7F]
    return [(bytes([c]), byte_ids[f"<0x{c:02X}>"]) for c in control if c not in in_pieces and f"<0x{c:02X}>" in byte_ids]
