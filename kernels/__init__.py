"""KLA kernels: chunkwise training/prefill (chunk_kla), decoding (fused_recurrent_kla), the
context-parallel span summary (chunk_kla_summary) and the float64 reference they are tested against.
No megatron import here: kla_megatron calls these, never the other way round."""

from .kla import chunk_kla, chunk_kla_summary, fused_recurrent_kla, naive_recurrent_kla

__all__ = ["chunk_kla", "chunk_kla_summary", "fused_recurrent_kla", "naive_recurrent_kla"]
