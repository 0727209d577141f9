"""The tokenizer of an exported folder: `AutoTokenizer` encodes every text exactly as training did.

Training encodes a document with `SentencePieceProcessor.encode(text)` (no BOS; data_prep/tokenizers.py), or with a
Hugging Face tokenizer.json and `add_special_tokens=False`. For a SentencePiece model we write a tokenizer.json
built from the model's own settings with the `tokenizers` library's parts, because transformers' converters do not
reproduce SentencePiece exactly and change between versions (4.x's Metaspace drops the dummy prefix before a
leading space, so " x" loses a "▁"): the normalizer turns spaces into "▁" and always prepends the dummy "▁"; a
pre-tokenizer cuts words where SentencePiece does (a word starts at a whitespace run, which stays whole when the
model allows whitespace-only pieces); BPE merges are ranked by the merged piece's score, which is SentencePiece's
merge order; byte fallback as trained. Control pieces in text (a literal "</s>") are plain text to SentencePiece,
hence `split_special_tokens`. A tokenizer.json is copied without its post-processor (training added no special
tokens).

Unigram models match up to SentencePiece's own Viterbi: it sums scores in float32 over a whole document and breaks
exact ties its own way, where tokenizers' Unigram sums each word in float64; tests/export/test_tokenizer.py measures
the disagreement (3.6e-5 of the tokens of real text). BPE, data_prep's default, matches exactly.
"""

import json
import shutil
from pathlib import Path

SENTENCEPIECE_BPE, SENTENCEPIECE_UNIGRAM = 2, 1
NORMAL_PIECE = 1
UNREACHABLE = -1e9


class TokenizerError(ValueError):
    """A tokenizer the export cannot reproduce exactly, named with the reason."""


def _sentencepiece_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _check_supported(proto, path: Path) -> None:
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    unsupported = []
    if trainer.model_type not in (SENTENCEPIECE_BPE, SENTENCEPIECE_UNIGRAM):
        unsupported.append(f"model_type {trainer.model_type} (only BPE and unigram)")
    if normalizer.precompiled_charsmap:
        unsupported.append(f"normalization rule {normalizer.name!r} (only 'identity')")
    if normalizer.remove_extra_whitespaces:
        unsupported.append("remove_extra_whitespaces=true")
    if not normalizer.escape_whitespaces or not trainer.split_by_whitespace or trainer.treat_whitespace_as_suffix:
        unsupported.append("whitespace handling other than escape_whitespaces, split_by_whitespace, whitespace as prefix")
    if any(piece.type == 4 for piece in proto.pieces):
        unsupported.append("user-defined symbols")
    if unsupported:
        raise TokenizerError(f"{path}: the export reproduces SentencePiece models as data_prep trains them; this one has "
                             f"{'; '.join(unsupported)}. Export with a tokenizer.json instead (--tokenizer)")


def sentencepiece_to_tokenizers(path: Path):
    """A `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor(model_file=path).encode`."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = _sentencepiece_proto(path)
    _check_supported(proto, path)
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    if trainer.model_type == SENTENCEPIECE_BPE:
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL_PIECE}
        ranked = sorted((-normal[piece][0], normal[piece][1], piece[:cut], piece[cut:])
                        for piece in normal for cut in range(1, len(piece))
                        if piece[:cut] in normal and piece[cut:] in normal)
        model = BPE(vocab={p.piece: i for i, p in enumerate(pieces)}, merges=[(a, b) for _, _, a, b in ranked],
                    unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    else:
        # Control, unknown and byte pieces come only from ids in SentencePiece, never from text: unreachable scores.
        scores = [(p.piece, p.score if p.type == NORMAL_PIECE else UNREACHABLE) for p in pieces]
        model = Unigram(scores, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if normalizer.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    word = "▁+[^▁]*|[^▁]+" if trainer.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    parts = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(parts)
    special = {"unk_token": trainer.unk_id, "bos_token": trainer.bos_id, "eos_token": trainer.eos_id,
               "pad_token": trainer.pad_id}
    return tokenizer, {key: pieces[i].piece for key, i in special.items() if i >= 0}


def write_tokenizer(source: Path, eod_id: int, folder: Path) -> dict:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (and the SentencePiece model, as
    trained, for the way back) into `folder`; returns the token ids for the model config: bos, eos (the
    end-of-document token training appended), pad (eos when the tokenizer has none)."""
    from tokenizers import Tokenizer

    if source.suffix == ".model":
        tokenizer, special = sentencepiece_to_tokenizers(source)
        shutil.copyfile(source, folder / "tokenizer.model")
        split_special_tokens = True
    else:
        tokenizer = Tokenizer.from_file(str(source))
        tokenizer.post_processor = None
        special = _configured_special_tokens(source.parent)
        split_special_tokens = False  # training's tokenizer.json matched its added tokens in text too
    for token in special.values():
        if tokenizer.token_to_id(token) is None:
            raise TokenizerError(f"{source}: special token {token!r} is not in the vocabulary")
    eos = tokenizer.id_to_token(eod_id)
    special["eos_token"] = eos
    special.setdefault("pad_token", eos)
    tokenizer.add_special_tokens(sorted(set(special.values()), key=tokenizer.token_to_id))
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "split_special_tokens": split_special_tokens,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: the model takes none
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    ids = {key.removesuffix("_token") + "_token_id": tokenizer.token_to_id(token) for key, token in special.items()}
    return {"bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids["eos_token_id"], "pad_token_id": ids["pad_token_id"]}


def _configured_special_tokens(folder: Path) -> dict:
    """bos/eos/unk/pad token strings of the HF config files beside a tokenizer.json."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found.setdefault(key, value)
    return found
