"""An exported model in megatron's terms and back: the HF config of a `ModelConfig`, and the parameter names of the
megatron GPTModel (tensor and pipeline parallel = 1) beside the HF model's (modeling_kla.py).

The tensors themselves are unchanged: the same layouts (in_proj rows [q | k | v | z | b | a], conv channels [q | k | v],
linear_qkv per head [q | k | v], linear_fc1 [SiLU half | linear half]), only the vocabulary rows differ: megatron's
embedding and output layer are padded to a multiple of 1024 rows (kla_megatron.model.padded_vocab_size), the export
keeps the tokenizer's rows.
"""

import dataclasses
import re

from kla_megatron.config import NAMED_MODELS, ModelConfig

# megatron name -> HF name; {i} is the layer number.
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.in_proj.weight": "mixer.in_proj.weight",
    "self_attention.conv_weight": "mixer.conv_weight",
    "self_attention.A_log": "mixer.A_log",
    "self_attention.dt_bias": "mixer.dt_bias",
    "self_attention.norm_weight": "mixer.norm_weight",
    "self_attention.out_proj.weight": "mixer.out_proj.weight",
    "self_attention.linear_qkv.weight": "mixer.qkv_proj.weight",
    "self_attention.linear_proj.weight": "mixer.o_proj.weight",
    "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight": "mlp.gate_up_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_MODEL_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
VOCABULARY_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def hf_name(megatron_name: str) -> str:
    """The HF model's name of a megatron parameter (both directions use it: the import walks megatron's)."""
    if megatron_name in _MODEL_NAMES:
        return _MODEL_NAMES[megatron_name]
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", megatron_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no HF name for megatron parameter {megatron_name}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def hf_config(model: ModelConfig, vocab_size: int, max_positions: int, token_ids: dict, dtype: str):
    """The KLAConfig of `model` with the tokenizer's `vocab_size` and `token_ids` (bos/eos/pad)."""
    from kla_megatron.hf.configuration_kla import KLAConfig

    return KLAConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_heads=model.num_heads,
        key_head_dim=model.key_head_dim,
        value_head_dim=model.value_head_dim,
        attention_head_dim=model.attention_head_dim,
        layer_mixers=[model.layer_mixer(i) for i in range(1, model.num_layers + 1)],
        conv_kernel=model.conv_kernel,
        kla_eps=model.kla_eps,
        rms_norm_eps=model.norm_eps,
        rope_theta=float(model.rope_base),
        max_position_embeddings=max_positions,
        initializer_range=model.init_std,
        tie_word_embeddings=model.tie_embeddings,
        torch_dtype=dtype,
        architectures=["KLAForCausalLM"],
        auto_map={"AutoConfig": "configuration_kla.KLAConfig", "AutoModel": "modeling_kla.KLAModel",
                  "AutoModelForCausalLM": "modeling_kla.KLAForCausalLM"},
        **token_ids,
    )


def model_config(config: dict) -> ModelConfig:
    """The ModelConfig of an exported folder's config.json; ValueError if it does not describe one of ours."""
    layer_mixers = config["layer_mixers"]
    recurrent = sorted(set(layer_mixers) - {"attention"})
    if len(recurrent) > 1:
        raise ValueError(f"layer_mixers mixes {recurrent}: a model has one recurrent mixer")
    attention = [i for i, kind in enumerate(layer_mixers, start=1) if kind == "attention"]
    model = ModelConfig(
        num_layers=len(layer_mixers),
        hidden_size=config["hidden_size"],
        num_heads=config["num_heads"],
        key_head_dim=config["key_head_dim"],
        value_head_dim=config["value_head_dim"],
        ffn_hidden_size=config["intermediate_size"],
        mixer=recurrent[0] if recurrent else "attention",
        attention_every=attention[0] if attention and recurrent else 0,
        attention_head_dim=config["attention_head_dim"],
        conv_kernel=config["conv_kernel"],
        kla_eps=config["kla_eps"],
        norm_eps=config["rms_norm_eps"],
        init_std=config["initializer_range"],
        tie_embeddings=config["tie_word_embeddings"],
        rope_base=int(config["rope_theta"]),
    )
    if [model.layer_mixer(i) for i in range(1, model.num_layers + 1)] != layer_mixers:
        raise ValueError(f"layer_mixers {layer_mixers} is not every N-th layer attention, the rest one mixer")
    return model


def model_section(model: ModelConfig) -> dict:
    """The training config's [model] section for `model`: the closest named model and the fields that differ."""
    def overrides(name):
        base = NAMED_MODELS[name]
        return {f.name: getattr(model, f.name) for f in dataclasses.fields(ModelConfig)
                if getattr(model, f.name) != getattr(base, f.name)}

    name = min(NAMED_MODELS, key=lambda n: len(overrides(n)))
    return {"name": name, "overrides": overrides(name)}
