"""Blends: several prepared datasets with weights, checked to share one tokenizer, in megatron's form.

megatron-core's BlendedMegatronDatasetConfig takes `blend=([prefix, ...], [weight, ...])`; the
pretrain config can hold the same lists, or point at the JSON that `write_blend` writes.
"""

import json
import os

from data_prep.atomic_files import write_json
from data_prep.indexed_writer import dataset_files
from data_prep.inputs import InputError


def describe_blend(prefixes: list[str], weights: list[float]) -> dict:
    if len(prefixes) != len(weights):
        raise InputError(f"{len(prefixes)} datasets but {len(weights)} weights: give one weight per dataset")
    if any(w <= 0 for w in weights):
        raise InputError("weights must be positive")
    metadata = [_read_metadata(p) for p in prefixes]
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
        "vocab_size": first["vocab_size"],
        "eod_id": first["eod_id"],
        "pad_id": first["pad_id"],
    }


def write_blend(path: str, blend: dict):
    write_json(path, blend)


def _read_metadata(prefix: str) -> dict:
    missing = [p for p in dataset_files(prefix) if not os.path.exists(p)]
    if missing:
        raise InputError(f"dataset {prefix} is missing {missing[0]}: run `python -m data_prep tokenize` for it first")
    with open(prefix + ".json") as f:
        return json.load(f)
