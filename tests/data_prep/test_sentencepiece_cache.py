"""The cached encoder must give exactly SentencePiece's ids, whatever the text."""

import random

import numpy as np
import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from data_prep.sentencepiece_cache import CachedSentencePieceEncoder
from data_prep.tokenizers import train_sentencepiece


def _proto(model_path):
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _tricky_documents(documents, seed=0):
    """Real documents, their slices at random offsets, and random mixes of awkward characters."""
    rng = random.Random(seed)
    alphabet = list(" \t\n\r  abcXYZ019_.,:;()[]{}\"'#=+-*/\\") + ["é", "ß", "東", "서", "🚀", "\x01", "\x02", "\x1f", "\x7f", "\u2581"]
    tricky = list(documents)
    for document in documents[:20]:
        start = rng.randrange(len(document))
        tricky.append(document[start : start + rng.randrange(1, 300)])
    for _ in range(200):
        tricky.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))))
    return [t for t in tricky if t]


def _assert_exact(encoder, processor, texts, eod):
    # Several batches, so later ones hit the cache filled by earlier ones.
    for start in range(0, len(texts), 37):
        batch = texts[start : start + 37]
        tokens, counts = encoder.encode([t.encode() for t in batch])
        expected = [processor.encode(t) + [eod] for t in batch]
        assert counts.tolist() == [len(e) for e in expected]
        assert tokens.tolist() == [i for e in expected for i in e]


def test_bpe_matches_sentencepiece(sp_model, sp, documents):
    proto = _proto(sp_model)
    assert CachedSentencePieceEncoder.supports(proto) is None
    encoder = CachedSentencePieceEncoder(sp, proto, sp.eos_id(), cache_bits=8)  # small: slots get reused
    texts = _tricky_documents(documents)
    _assert_exact(encoder, sp, texts * 2, sp.eos_id())


def test_unigram_models_take_the_plain_path(tmp_path, documents):
    train_sentencepiece(iter(documents * 3), str(tmp_path), 500, "unigram", threads=2)
    assert CachedSentencePieceEncoder.supports(_proto(str(tmp_path / "tokenizer.model"))) == "not a BPE model"


def test_text_holding_every_separator_is_still_exact(sp_model, sp):
    proto = _proto(sp_model)
    encoder = CachedSentencePieceEncoder(sp, proto, sp.eos_id())
    every_separator = "".join(chr(s[0][0]) for s in encoder.separators)
    _assert_exact(encoder, sp, [f"a {every_separator} b", "plain text"], sp.eos_id())


def test_models_that_rewrite_text_take_the_plain_path(tmp_path, documents):
    model = tmp_path / "nfkc.model"
    with open(model, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(documents * 3), model_writer=f, model_type="bpe", vocab_size=400, byte_fallback=True, minloglevel=2
        )
    reason = CachedSentencePieceEncoder.supports(_proto(model))
    assert reason is not None and "nmt_nfkc" in reason


@pytest.mark.parametrize("bits", [4, 12])
def test_cache_size_does_not_change_ids(sp_model, sp, documents, bits):
    encoder = CachedSentencePieceEncoder(sp, _proto(sp_model), sp.eos_id(), cache_bits=bits)
    tokens, _ = encoder.encode([d.encode() for d in documents])
    expected = np.concatenate([sp.encode(d) + [sp.eos_id()] for d in documents])
    assert np.array_equal(tokens, expected)
