"""Initial weights that depend on the seed alone, not on the parallel layout.

Megatron draws each tensor-parallel shard from its rank's own random stream, and each pipeline stage from its
own, so the same seed gives another model at TP=2 or PP=2 than on one GPU, and a parallel run cannot be compared
with the one-GPU run from its first step. Here every weight is drawn whole, from a generator seeded by the seed
and the weight's checkpoint key (which names the global layer and, for split projections, the part), and each
rank keeps the slice its checkpoint metadata says it holds: the same model at every TP/PP/CP/DP layout.

Distributions are megatron's: N(0, init_std) for linear layers and embeddings, N(0, init_std / sqrt(2 layers))
for the projections that write into the residual stream. Norm weights (ones) and the mixer's own parameters
(A_log, dt_bias, conv: drawn per layer for all heads and sliced already) are left as they are.
"""

import math
import zlib

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.transformer import TransformerConfig

# Weights written into the residual stream: scaled as megatron's output_layer_init_method.
RESIDUAL_OUTPUTS = ("out_proj.weight", "linear_proj.weight", "linear_fc2.weight")
DRAWN = RESIDUAL_OUTPUTS + ("in_proj.weight", "linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight",
                            "output_layer.weight")


def _std(key: str, config: TransformerConfig):
    """The init std of the weight a checkpoint key names, or None for weights initialised elsewhere."""
    name = key.rsplit(".", 1)[0] if not key.endswith(".weight") else key  # split parts: in_proj.weight.query
    if not name.endswith(DRAWN):
        return None
    if name.endswith(RESIDUAL_OUTPUTS):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, config: TransformerConfig, seed: int) -> None:
    """Redraw `model`'s weights (a megatron module with `sharded_state_dict`, e.g. kla_megatron.ModelChunks)
    layout-independently."""
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    for tensor in nested_values(sharded):
        if not isinstance(tensor, ShardedTensor) or tensor.flattened_range is not None:
            continue
        std = _std(tensor.key, config)
        if std is None:
            continue
        generator = torch.Generator(device=tensor.data.device).manual_seed(seed * 1_000_003 + zlib.crc32(tensor.key.encode()))
        whole = torch.empty(tensor.global_shape, dtype=torch.float32, device=tensor.data.device)
        whole.normal_(0.0, std, generator=generator)
        prepended = tensor.prepend_axis_num
        index = tuple(tensor.global_offset[:prepended]) + tuple(
            slice(offset, offset + size) for offset, size in zip(tensor.global_offset[prepended:], tensor.data.shape))
        tensor.data.copy_(whole[index])
