"""Triton kernels and their references: the KLA recurrence for training/prefill (chunk_kla), decoding
(fused_recurrent_kla) and the context-parallel span summary (chunk_kla_summary); the short causal
convolution before it (causal_conv1d). No megatron import here: kla_megatron calls these, never the
other way round."""

from .conv import causal_conv1d, naive_causal_conv1d
from .kla import chunk_kla, chunk_kla_summary, fused_recurrent_kla, naive_recurrent_kla

__all__ = ["causal_conv1d", "chunk_kla", "chunk_kla_summary", "fused_recurrent_kla", "naive_causal_conv1d",
           "naive_recurrent_kla"]
