"""Our kernels, each beside its PyTorch path and plain reference: the KLA recurrence for training/prefill
(chunk_kla), decoding (fused_recurrent_kla) and context parallelism (chunk_kla_summary), the short causal conv
before it (causal_conv1d), the fused (gated) RMSNorm and the vocabulary-parallel cross-entropy. No megatron import
here: kla_megatron calls these, never the other way round."""

from .conv import causal_conv1d, naive_causal_conv1d
from .cross_entropy import vocab_parallel_cross_entropy
from .kla import chunk_kla, chunk_kla_summary, fused_recurrent_kla, naive_recurrent_kla
from .norm import rms_norm

__all__ = ["causal_conv1d", "chunk_kla", "chunk_kla_summary", "fused_recurrent_kla", "naive_causal_conv1d",
           "naive_recurrent_kla", "rms_norm", "vocab_parallel_cross_entropy"]
