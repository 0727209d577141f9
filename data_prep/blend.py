"""Blends: several prepared datasets with weights, checked to share one tokenizer, in megatron's form.

megatron-core's BlendedMegatronDatasetConfig takes `blend=([prefix, ...], [weight, ...])`; the
pretrain config can hold the same lists, or point `data.manifest` at the JSON that `write_blend`
writes (its train_prefixes / train_weights / valid_prefixes / valid_weights / tokenizer_model).
Datasets may be named by glob ('data/web_*_train' matches every PREFIX.idx it finds), and without
weights each dataset weighs its token count, so the blend reads like the datasets' concatenation:
what the shards of one corpus tokenized by a Slurm array need (slurm/prepare_data.sh).
"""

import glob
import json
import os
from typing import Optional

from data_prep.atomic_files import write_json
from data_prep.indexed_writer import dataset_files
from data_prep.inputs import InputError


def expand_datasets(names: list[str]) -> list[str]:
    """Prefixes, with each glob replaced by the prefixes of the PREFIX.idx files it matches (sorted)."""
    prefixes = []
    for name in names:
        if glob.has_magic(name):
            matches = sorted(path[: -len(".idx")] for path in glob.glob(name + ".idx"))
            if not matches:
                raise InputError(f"--datasets {name!r} matches no PREFIX.idx files: check the pattern")
            prefixes += matches
        else:
            prefixes.append(name)
    return prefixes


def describe_blend(prefixes: list[str], weights: Optional[list[float]] = None) -> dict:
    """The checked blend; weights default to each dataset's token count (empty datasets left out)."""
    metadata = [_read_metadata(p) for p in prefixes]
    if weights is None:
        kept = [i for i, m in enumerate(metadata) if m["tokens"]]
        if not kept:
            raise InputError(f"the {len(prefixes)} dataset(s) hold no tokens: nothing to blend")
        prefixes, metadata = [prefixes[i] for i in kept], [metadata[i] for i in kept]
        weights = [m["tokens"] for m in metadata]
    if len(prefixes) != len(weights):
        raise InputError(f"{len(prefixes)} datasets but {len(weights)} weights: give one weight per dataset")
    if any(w <= 0 for w in weights):
        raise InputError("weights must be positive")
    first = metadata[0]
    for prefix, meta in zip(prefixes[1:], metadata[1:]):
        for key in ("tokenizer_sha256", "vocab_size", "eod_id"):
            if meta[key] != first[key]:
                raise InputError(
                    f"{prefix} was tokenized differently from {prefixes[0]} ({key} {meta[key]} vs {first[key]}):"
                    " re-tokenize it with the same tokenizer"
                )
    total = sum(weights)
    return {
        "prefixes": [os.path.abspath(p) for p in prefixes],
        "weights": [w / total for w in weights],
        "tokens": [m["tokens"] for m in metadata],
        "tokenizer_model": first["tokenizer_model"],
        "tokenizer_sha256": first["tokenizer_sha256"],
        "vocab_size": first["vocab_size"],
        "eod_id": first["eod_id"],
        "pad_id": first["pad_id"],
    }


def training_manifest(train: dict, valid: Optional[dict]) -> dict:
    """A train blend (and a validation blend) as the manifest `data.manifest` reads."""
    if valid is not None and valid["tokenizer_sha256"] != train["tokenizer_sha256"]:
        raise InputError("the validation datasets were tokenized with another tokenizer than the training datasets")
    manifest = dict(train, train_prefixes=train["prefixes"], train_weights=train["weights"])
    if valid is not None:
        manifest.update(valid_prefixes=valid["prefixes"], valid_weights=valid["weights"], valid_tokens=valid["tokens"])
    return manifest


def write_blend(path: str, blend: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, blend)


def _read_metadata(prefix: str) -> dict:
    missing = [p for p in dataset_files(prefix) if not os.path.exists(p)]
    if missing:
        raise InputError(f"dataset {prefix} is missing {missing[0]}: run `python -m data_prep tokenize` for it first")
    with open(prefix + ".json") as f:
        return json.load(f)
