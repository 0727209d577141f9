"""Triton kernels and their references: the KLA recurrence for training/prefill (chunk_kla), its
context-parallel form over ranks (chunk_kla_context_parallel, with the conv halo and document slicing of
kernels.context_parallel), decoding (fused_recurrent_kla) and the span summary (chunk_kla_summary); the short
causal convolution before it (causal_conv1d); the fused (gated) RMSNorm (rms_norm) and the vocabulary-parallel
cross-entropy (vocab_parallel_cross_entropy). No megatron import here: kla_megatron calls these, never the
other way round."""

from .context_parallel import conv_halo, local_documents
from .conv import causal_conv1d, naive_causal_conv1d
from .cross_entropy import vocab_parallel_cross_entropy
from .kla import chunk_kla, chunk_kla_context_parallel, chunk_kla_summary, fused_recurrent_kla, naive_recurrent_kla
from .norm import rms_norm

__all__ = ["causal_conv1d", "chunk_kla", "chunk_kla_context_parallel", "chunk_kla_summary", "conv_halo",
           "fused_recurrent_kla", "local_documents", "naive_causal_conv1d", "naive_recurrent_kla", "rms_norm",
           "vocab_parallel_cross_entropy"]
