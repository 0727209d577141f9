"""Softmax attention's core for the transformer and hybrid models: PyTorch's fused attention behind
megatron's core-attention interface (the `core_attention` of megatron's SelfAttention spec).

Megatron's own `DotProductAttention` materialises the [b, heads, s, s] scores (85 GiB for the 0.4B transformer
at 4K tokens, 0.39x the speed of Hugging Face Llama with SDPA); its fused alternatives need Transformer Engine.
Here `scaled_dot_product_attention` picks the flash kernel on GPU (causal, any head layout with a contiguous
last dim, so megatron's [s, b, heads, d] views go in without copies); packed documents (megatron's THD
format) run the variable-length flash kernel, and on CPU one causal SDPA call per document.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class FlashSelfAttention(MegatronModule):
    """Causal self-attention over this rank's heads: q [s, b, heads, d], k, v [s, b, groups, d] -> [s, b, heads d]
    (packed: q [t, heads, d] -> [t, heads d])."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"FlashSelfAttention is causal self-attention only, got mask type {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("FlashSelfAttention has no attention dropout (pretraining runs without it); set it to 0")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.grouped = config.num_query_groups is not None and config.num_query_groups != config.num_attention_heads

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        if attention_bias is not None:
            raise ValueError("FlashSelfAttention takes no attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        s, b, heads, d = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d] views
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=self.grouped)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    def _packed(self, query, key, value, params: PackedSeqParams):
        """Documents packed along t ([t, heads, d]): attention never crosses a document start."""
        t, heads, d = query.shape
        cu = params.cu_seqlens_q
        if query.is_cuda:
            from torch.nn.attention.varlen import varlen_attn

            longest = params.max_seqlen_q
            grouped = {"enable_gqa": True} if self.grouped else {}
            out = varlen_attn(query, key, value, cu, cu, longest, longest, scale=self.softmax_scale,
                              window_size=(-1, 0), **grouped)
        else:
            out = torch.empty_like(query)
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
                q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
                out[start:end] = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=self.grouped).transpose(0, 1)
        return out.reshape(t, heads * d)
