"""Tokenizers: load a SentencePiece model or a Hugging Face tokenizer.json, encode documents, train ours.

A document's tokens are the tokenizer's encoding of its text, without BOS or other added special
tokens, followed by one end-of-document (eod) token:
  - SentencePiece: `encode(text)` (no bos/eos options); eod is the model's eos (`</s>` in ours),
    or the piece named by --eod-token.
  - Hugging Face: `Tokenizer.encode(text, add_special_tokens=False)`; eod is --eod-token, else the
    eos_token of tokenizer_config.json / special_tokens_map.json beside tokenizer.json, else a
    well-known end token present in the vocabulary.

Models we train: BPE (or unigram), byte fallback, Llama-style loss-free normalization (identity,
spaces kept), digits split, ids unk=0 <unk>, bos=1 <s>, eos=2 </s> (the eod), pad=3 <pad>.
"""

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from data_prep.atomic_files import PARTIAL_SUFFIX, write_json
from data_prep.inputs import InputError

SPECIAL_TOKENS = {"unk": ("<unk>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<pad>", 3)}
TOKENIZER_META = "tokenizer_meta.json"
_WELL_KNOWN_EOD = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


@dataclass(frozen=True)
class TokenizerInfo:
    """What a dataset needs to know about its tokenizer (also written into the dataset metadata)."""

    kind: str  # "sentencepiece" or "huggingface"
    path: str  # absolute path of tokenizer.model / tokenizer.json
    sha256: str
    vocab_size: int
    eod_id: int
    pad_id: int | None

    def token_dtype(self):
        """What megatron-core's DType.optimal_dtype picks for this vocabulary: uint16 below 65500."""
        return np.uint16 if self.vocab_size < 65500 else np.int32


def load_tokenizer_info(path: str, eod_token: str | None = None) -> TokenizerInfo:
    """Describe the tokenizer at `path`: a .model file, a tokenizer.json, or a directory holding one."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise InputError(f"tokenizer directory {path} holds neither tokenizer.model nor tokenizer.json")
    if not os.path.exists(path):
        raise InputError(f"tokenizer {path} does not exist: train one with `python -m data_prep train-tokenizer` or check the path")
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    if path.endswith(".json"):
        return _huggingface_info(path, sha256, eod_token)
    return _sentencepiece_info(path, sha256, eod_token)


def _sentencepiece_info(path: str, sha256: str, eod_token: str | None) -> TokenizerInfo:
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        raise InputError(f"{path} is not a SentencePiece model ({error}); give a .model file or a tokenizer.json") from None
    eod_id = processor.eos_id() if eod_token is None else processor.piece_to_id(eod_token)
    if eod_id < 0 or (eod_token is not None and processor.id_to_piece(eod_id) != eod_token):
        raise InputError(f"{path} has no {eod_token or 'eos'} piece to end documents with: pass --eod-token PIECE")
    pad_id = processor.pad_id()
    return TokenizerInfo("sentencepiece", path, sha256, processor.vocab_size(), eod_id, pad_id if pad_id >= 0 else None)


def _huggingface_info(path: str, sha256: str, eod_token: str | None) -> TokenizerInfo:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    configured = _configured_special_tokens(os.path.dirname(path))
    candidates = [eod_token] if eod_token else [configured.get("eos_token"), *_WELL_KNOWN_EOD]
    eod_id = next((tokenizer.token_to_id(t) for t in candidates if t and tokenizer.token_to_id(t) is not None), None)
    if eod_id is None:
        wanted = eod_token or "an end-of-document token"
        raise InputError(f"{path} has no {wanted}: pass --eod-token TOKEN naming one in its vocabulary")
    pad = configured.get("pad_token")
    pad_id = tokenizer.token_to_id(pad) if pad else None
    return TokenizerInfo("huggingface", path, sha256, tokenizer.get_vocab_size(with_added_tokens=True), eod_id, pad_id)


def _configured_special_tokens(directory: str) -> dict:
    """eos_token / pad_token strings from the HF config files beside tokenizer.json, if any."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(directory, name)) as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        for key in ("eos_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found.setdefault(key, value)
    return found


def cached_path_unavailable(info: TokenizerInfo) -> str | None:
    """Why documents cannot take the cached SentencePiece path (None: they do)."""
    if info.kind != "sentencepiece":
        return "a Hugging Face tokenizer encodes with its own batch encoder"
    from data_prep.sentencepiece_cache import CachedSentencePieceEncoder

    return CachedSentencePieceEncoder.supports(_model_proto(info.path))


def _model_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


class DocumentEncoder:
    """Encodes batches of documents (UTF-8 bytes) to one token array with eod after each document."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.cached = None
        if info.kind == "sentencepiece":
            import sentencepiece

            from data_prep.sentencepiece_cache import CachedSentencePieceEncoder

            self.processor = sentencepiece.SentencePieceProcessor(model_file=info.path)
            if cached_path_unavailable(info) is None:
                self.cached = CachedSentencePieceEncoder(self.processor, _model_proto(info.path), info.eod_id)
        else:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(info.path)

    def encode(self, documents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens in the output dtype, token count per document), eod included."""
        if not documents:
            return np.zeros(0, self.info.token_dtype()), np.zeros(0, np.int64)
        if self.cached is not None:
            tokens, counts = self.cached.encode(documents)
            return tokens.astype(self.info.token_dtype()), counts
        if self.info.kind == "sentencepiece":
            encoded = self.processor.encode(documents, out_type="numpy", num_threads=1)
        else:
            texts = [d.decode() for d in documents]
            encoded = [np.array(e.ids, np.int64) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        counts = np.array([len(ids) + 1 for ids in encoded], np.int64)
        tokens = np.concatenate([np.append(ids, self.info.eod_id) for ids in encoded])
        return tokens.astype(self.info.token_dtype()), counts


def train_sentencepiece(
    documents, output_dir: str, vocab_size: int, model_type: str = "bpe", threads: int | None = None
) -> dict:
    """Train on `documents` (an iterable of str) and write tokenizer.model and its metadata into output_dir.

    Returns the metadata written to tokenizer_meta.json.
    """
    import io

    import sentencepiece

    os.makedirs(output_dir, exist_ok=True)
    model = io.BytesIO()
    stats = {"documents": 0, "bytes": 0}

    def training_sentences():
        for text in documents:
            stats["documents"] += 1
            stats["bytes"] += len(text)
            yield from _training_chunks(text)

    ids = {f"{name}_id": token_id for name, (_, token_id) in SPECIAL_TOKENS.items()}
    pieces = {f"{name}_piece": piece for name, (piece, _) in SPECIAL_TOKENS.items()}
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            # Llama-style and loss-free: text is kept as is (no NFKC, spaces not collapsed), so
            # decode(encode(text)) == text and code keeps its indentation.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            input_sentence_size=0,  # we sampled already
            max_sentence_length=1 << 15,
            num_threads=threads or os.cpu_count(),
            minloglevel=2,
            **ids,
            **pieces,
        )
    except RuntimeError as error:
        if "Vocabulary size" in str(error):
            raise InputError(
                f"--vocab-size {vocab_size} is too large for {stats['bytes']:,} bytes of training text "
                f"({error}): lower --vocab-size or give more text"
            ) from None
        raise
    if stats["documents"] == 0:
        raise InputError("no documents to train the tokenizer on: the inputs hold no text")
    model_path = os.path.join(output_dir, "tokenizer.model")
    with open(model_path + PARTIAL_SUFFIX, "wb") as f:
        f.write(model.getvalue())
    os.replace(model_path + PARTIAL_SUFFIX, model_path)
    meta = {
        "type": "sentencepiece",
        "model_type": model_type,
        "vocab_size": vocab_size,
        **ids,
        "eod_id": SPECIAL_TOKENS["eos"][1],
        **{f"{name}_token": piece for name, (piece, _) in SPECIAL_TOKENS.items()},
        "byte_fallback": True,
        "normalization": "identity",
        "add_dummy_prefix": True,
        "trained_on": stats,
    }
    write_json(os.path.join(output_dir, TOKENIZER_META), meta)
    _write_huggingface_config(output_dir)
    return meta


def _training_chunks(text: str, max_chars: int = 4096):
    """Whole lines (newlines kept, so pieces such as '):\\n' are learned) in chunks SentencePiece accepts."""
    chunk = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            yield line[:max_chars]
            line = line[max_chars:]
        if size + len(line) > max_chars and chunk:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield "".join(chunk)


def _write_huggingface_config(output_dir: str):
    """tokenizer_config.json / special_tokens_map.json so transformers can load the directory."""
    tokens = {f"{name}_token": piece for name, (piece, _) in SPECIAL_TOKENS.items()}
    write_json(os.path.join(output_dir, "special_tokens_map.json"), tokens)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **tokens,
        # Documents were tokenized without BOS and end with eos: the model never saw a BOS.
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 1 << 30,
    }
    write_json(os.path.join(output_dir, "tokenizer_config.json"), config)
