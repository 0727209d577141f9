"""Layer and block specs: a KLA layer is megatron's TransformerLayer with KLAMixer where attention was.

All mixers share the rest of the layer (pre-norm RMSNorm, SwiGLU MLP, residuals), so KLA, GDN,
hybrid and transformer models differ only in the `self_attention` entry of each layer's spec.
"""

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from kla_megatron.attention import FlashSelfAttention
from kla_megatron.config import Mixer, ModelConfig
from kla_megatron.mixer import KLAMixer, KLAMixerSubmodules
from kla_megatron.norms import RMSNorm

BETA_MODE = {"kla": "kaczmarz", "gdn": "sigmoid"}


def mixer_spec(mixer: Mixer, model: ModelConfig) -> ModuleSpec:
    if mixer == "attention":
        return ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=ColumnParallelLinear,
                core_attention=FlashSelfAttention,
                linear_proj=RowParallelLinear,
                q_layernorm=IdentityOp,
                k_layernorm=IdentityOp,
            ),
        )
    return ModuleSpec(
        module=KLAMixer,
        params={"beta_mode": BETA_MODE[mixer], "eps": model.kla_eps, "kernel_backend": model.kernel_backend,
                "keep_states": model.kernel_keep_states},
        submodules=KLAMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
    )


def norm_spec(model: ModelConfig) -> ModuleSpec:
    return ModuleSpec(module=RMSNorm, params={"backend": model.kernel_backend})


def layer_spec(mixer: Mixer, model: ModelConfig) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm_spec(model),
            self_attention=mixer_spec(mixer, model),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm_spec(model),
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(model: ModelConfig, config: TransformerConfig, pp_rank: int = 0, vp_stage=None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, each with its own mixer, and the final norm."""
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    count = get_num_layers_to_build(config, vp_stage, pp_rank)
    layers = [layer_spec(model.layer_mixer(offset + i + 1), model) for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm_spec(model))
