"""FlashSelfAttention (the transformer/hybrid core attention) against causal softmax attention in float64,
in megatron's [s, b, heads, d] layout and in its packed-document (THD) layout."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from kla_megatron.attention import FlashSelfAttention
from kla_megatron.config import named_model, transformer_config
from kla_model_testing import rel_err

TOL = 1e-6


def reference(q, k, v, scale):
    """q, k, v [s, heads, d] -> [s, heads d], causal, float64."""
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    s = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(s, -1)


def module():
    config = transformer_config(named_model("transformer-0.4b"), use_cpu_initialization=True)
    return FlashSelfAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal), config.kv_channels ** -0.5


def test_matches_causal_softmax_attention():
    attn, scale = module()
    gen = torch.Generator().manual_seed(0)
    s, b, heads, d = 9, 2, 3, 16
    q, k, v = (torch.randn(s, b, heads, d, generator=gen, requires_grad=True) for _ in range(3))
    out = attn(q, k, v, None)
    assert out.shape == (s, b, heads * d)
    ref = torch.stack([reference(q[:, i], k[:, i], v[:, i], scale) for i in range(b)], 1)
    assert rel_err(out, ref) < TOL
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out.double() * cot).sum(), (q, k, v))
    want = torch.autograd.grad((ref * cot).sum(), (q, k, v))
    for name, a, b_ in zip("qkv", got, want):
        assert rel_err(a, b_) < TOL, name


def test_packed_documents_never_attend_across_a_start():
    attn, scale = module()
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    q, k, v = (torch.randn(10, 2, 8, generator=gen) for _ in range(3))
    params = PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6, qkv_format="thd")
    out = attn(q, k, v, None, packed_seq_params=params)
    ref = torch.cat([reference(q[a:b], k[a:b], v[a:b], scale) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert rel_err(out, ref) < TOL


def test_refuses_attention_dropout():
    config = transformer_config(named_model("transformer-0.4b"), use_cpu_initialization=True)
    with pytest.raises(ValueError, match="dropout"):
        FlashSelfAttention(config, 1, AttnMaskType.causal, attention_dropout=0.1)
