"""Training data: data_prep's indexed datasets through megatron-core's GPTDataset and blending.

`DataFiles.resolve` checks every file before any process group or GPU memory exists; the
datasets are megatron's own (BlendedMegatronDatasetBuilder over GPTDataset); `MicroBatches` hands
each data-parallel rank its own samples in a fixed order, from a position that a checkpoint stores.
"""

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tokenizers import MegatronTokenizer

from kernels import local_documents

from pretrain.config import ConfigError, DataSection


@dataclass(frozen=True)
class Blend:
    prefixes: list
    weights: Optional[list]

    def megatron(self):
        return (self.prefixes, self.weights)


@dataclass(frozen=True)
class DataFiles:
    tokenizer: str
    train: Blend
    valid: Optional[Blend]
    split: str

    @staticmethod
    def resolve(data: DataSection) -> "DataFiles":
        """The checked files of a data section (a manifest fills what the section leaves empty)."""
        tokenizer, train, valid = data.tokenizer, list(data.train_prefixes), list(data.valid_prefixes)
        train_weights, valid_weights = list(data.train_weights), list(data.valid_weights)
        if data.manifest:
            manifest_path = Path(data.manifest)
            if not manifest_path.is_file():
                raise ConfigError(
                    f"data.manifest {manifest_path} does not exist; run `python -m data_prep default-corpus "
                    f"--output {manifest_path.parent}` or point data.manifest at a data_prep manifest.json"
                )
            manifest = json.loads(manifest_path.read_text())
            tokenizer = tokenizer or manifest["tokenizer_model"]
            # default-corpus writes one train and one valid prefix; `data_prep blend --output` weighted lists
            if not train:
                train = manifest.get("train_prefixes") or [manifest["train_prefix"]]
                train_weights = train_weights or manifest.get("train_weights", [])
            if not valid:
                valid = manifest.get("valid_prefixes") or ([manifest["valid_prefix"]] if "valid_prefix" in manifest else [])
                valid_weights = valid_weights or manifest.get("valid_weights", [])
        if not tokenizer:
            raise ConfigError(
                "no data: set data.tokenizer and data.train_prefixes, or data.manifest (to try things, "
                "`python -m data_prep default-corpus --output DIR` writes DIR/manifest.json)"
            )
        if not Path(tokenizer).exists():
            raise ConfigError(f"tokenizer {tokenizer} does not exist; set data.tokenizer to the file data_prep used")
        if not train:
            raise ConfigError("no training data: set data.train_prefixes (PREFIX of PREFIX.bin/.idx) or data.manifest")
        tokenizer_sha256 = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest() if Path(tokenizer).is_file() else None
        for prefix in train + valid:
            check_indexed_dataset(prefix, tokenizer_sha256)
        return DataFiles(
            tokenizer=str(tokenizer),
            train=Blend(train, _weights(train_weights, train, "train")),
            valid=Blend(valid, _weights(valid_weights, valid, "valid")) if valid else None,
            split=data.split,
        )


def _weights(weights: list, prefixes: list, which: str) -> Optional[list]:
    if not weights:
        return None
    if len(weights) != len(prefixes) or any(w <= 0 for w in weights):
        raise ConfigError(
            f"data.{which}_weights must give one positive weight per prefix ({len(prefixes)}), got {weights}"
        )
    return [float(w) for w in weights]


def check_indexed_dataset(prefix: str, tokenizer_sha256: Optional[str] = None) -> None:
    """Stop early, with the fix, on a missing, empty or corrupt PREFIX.bin/.idx, or one that
    data_prep's PREFIX.json says was written with another tokenizer."""
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise ConfigError(
                f"dataset {prefix}{suffix} does not exist; write it with "
                f"`python -m data_prep tokenize --output-prefix {prefix} ...` or fix the path"
            )
    documents, expected = _read_index(prefix)
    if documents == 0:
        raise ConfigError(
            f"dataset {prefix} is empty (0 documents); re-run data_prep tokenize with more input or a larger "
            "--valid-fraction, or leave it out of the config"
        )
    bin_bytes = Path(prefix + ".bin").stat().st_size
    if bin_bytes != expected:
        raise ConfigError(
            f"dataset {prefix}.bin has {bin_bytes} bytes but its .idx describes {expected}; "
            "the pair is from different runs or truncated: re-run data_prep tokenize"
        )
    metadata = Path(prefix + ".json")
    if tokenizer_sha256 and metadata.is_file():
        written_with = json.loads(metadata.read_text()).get("tokenizer_sha256")
        if written_with and written_with != tokenizer_sha256:
            raise ConfigError(
                f"dataset {prefix} was tokenized with another tokenizer than data.tokenizer (see {metadata}); "
                "point data.tokenizer at the one data_prep used, or re-tokenize the dataset"
            )


def _read_index(prefix: str) -> tuple[int, int]:
    """(sequences, bytes of .bin they describe) from the header and last entries of PREFIX.idx.

    Read here rather than through megatron's IndexedDataset, whose constructor, when it fails on a
    bad or empty file, leaves an object that prints two "Exception ignored in __del__" tracebacks.
    Layout: magic (9 bytes), version <Q, dtype code <B, sequences n <Q, document starts d <Q,
    lengths int32[n], byte offsets int64[n], document starts int64[d]."""
    path = Path(prefix + ".idx")
    corrupt = f"dataset index {path} is corrupt ({{}}); re-run data_prep tokenize for it"
    with open(path, "rb") as f:
        header = f.read(34)
        if len(header) < 34 or header[:9] != _INDEX_HEADER:
            raise ConfigError(corrupt.format("not a megatron indexed dataset header"))
        version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
        if version != 1 or code not in {d.value for d in DType}:
            raise ConfigError(corrupt.format(f"version {version}, dtype code {code}"))
        if path.stat().st_size != 34 + 12 * sequences + 8 * documents:
            raise ConfigError(corrupt.format(f"{path.stat().st_size} bytes, but its header promises {sequences} sequences"))
        if sequences == 0:
            return 0, 0
        f.seek(34 + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(34 + 4 * sequences + 8 * (sequences - 1))
        (last_offset,) = struct.unpack("<q", f.read(8))
    return sequences, last_offset + last_length * DType.size(code)


def load_tokenizer(path: str):
    """megatron's tokenizer for a SentencePiece model or a Hugging Face tokenizer.json / folder."""
    library = "sentencepiece" if path.endswith(".model") else "huggingface"
    target = str(Path(path).parent) if path.endswith("tokenizer.json") else path
    return MegatronTokenizer.from_pretrained(target, metadata_path={"library": library})


def build_datasets(files: DataFiles, tokenizer, seq_length: int, seed: int, train_samples: int, valid_samples: int,
                   cache_dir: str, reset_at_eod: bool = False):
    """(train, valid) GPTDatasets; valid is None when there are no validation samples to build. reset_at_eod:
    position ids restart after every EOD token (model_inputs reads document starts from them)."""
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if files.valid else files.train.megatron(),
        blend_per_split=[files.train.megatron(), files.valid.megatron(), None] if files.valid else None,
        split=None if files.valid else files.split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_at_eod,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


class MicroBatches:
    """Step-by-step micro-batches for one data-parallel rank.

    Step s uses samples [s*G, (s+1)*G) of the dataset (G = global batch); within it, micro-batch j
    of data-parallel rank r is samples s*G + (j*D + r)*m + [0, m). The position is the number of
    samples consumed, so a resumed run continues with exactly the samples it would have seen.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def step(self, num_microbatches: int) -> Iterator[dict]:
        """The micro-batches of the next step; consumes a global batch whether or not all are read."""
        start = self.consumed_samples
        self.consumed_samples += num_microbatches * self.micro_batch_size * self.dp_size
        return (self._batch(start + (j * self.dp_size + self.dp_rank) * self.micro_batch_size) for j in range(num_microbatches))

    def _batch(self, first: int) -> dict:
        samples = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.micro_batch_size)]
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}


@dataclass
class SlicePackedSeqParams(PackedSeqParams):
    """megatron's packed-sequence parameters (THD) of one context-parallel slice: the documents' local offsets
    and whether the first one began on an earlier rank (the KLA mixer then receives its state)."""

    first_document_continues: bool = False


def model_inputs(batch: dict, *, packed: bool, cp_rank: int = 0, cp_size: int = 1):
    """A micro-batch of whole samples (tokens, labels, loss_mask, position_ids: [b, s], on the host) ->
    (this rank's inputs, packed_seq_params or None).

    packed: documents end at EOD (the dataset restarts position ids after it); the samples are laid along one
    row with their document offsets (megatron's THD format), so no conv tap, recurrent state or attention
    crosses a document start. Context parallelism keeps the rank's contiguous slice of every sample (of the
    one packed row), cut before anything reaches the GPU."""
    if not packed:
        if cp_size == 1:
            return batch, None
        s = batch["tokens"].shape[1] // cp_size
        return {k: v[:, cp_rank * s:(cp_rank + 1) * s] for k, v in batch.items()}, None
    flat = {k: v.reshape(1, -1) for k, v in batch.items()}
    total = flat["tokens"].shape[1]
    starts = (flat["position_ids"][0] == 0).nonzero()[:, 0].tolist()
    offsets = starts + [total]
    start, end = cp_rank * total // cp_size, (cp_rank + 1) * total // cp_size
    if cp_size > 1:
        flat = {k: v[:, start:end] for k, v in flat.items()}
    cu_seqlens, continues = local_documents(offsets, start, end)
    longest = int(torch.diff(cu_seqlens).max())
    params = SlicePackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                  max_seqlen_q=longest, max_seqlen_kv=longest, first_document_continues=continues)
    return flat, params
