"""The peers our benchmarks run beside ours, installed for benchmarking only (fla, transformers):
fla's Hopper guard and the peer models at the paper's 0.4B shape."""

PAPER_SHAPE = dict(hidden=1536, layers=11, heads=12, ffn=6144)


def unlock_fla_backward():
    """fla refuses its gated backward under Triton < 3.7.1 on Hopper (a miscompile, fla #640); lifted for timing
    only: benchmarks that call this do not use fla's gradient values."""
    import fla.ops.common.chunk_o

    fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True


def fla_gdn_model(vocab_size: int):
    """fla's GatedDeltaNetForCausalLM at the paper's shape (head_dim 96, values 2x), fused cross-entropy."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    unlock_fla_backward()
    s = PAPER_SHAPE
    config = GatedDeltaNetConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_heads=s["heads"], head_dim=s["hidden"] * 3 // 4 // s["heads"],
        expand_v=2, intermediate_size=s["ffn"], vocab_size=vocab_size, fuse_cross_entropy=True, tie_word_embeddings=False,
    )
    return GatedDeltaNetForCausalLM(config)


def hf_llama_model(vocab_size: int):
    """transformers' LlamaForCausalLM with SDPA attention at the same width, depth and MLP (head dim 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = PAPER_SHAPE
    config = LlamaConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"], intermediate_size=s["ffn"], vocab_size=vocab_size, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)
