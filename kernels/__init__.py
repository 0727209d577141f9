"""KLA kernels: chunkwise training/prefill (chunk_kla), its context-parallel form over ranks
(chunk_kla_context_parallel, with the conv halo and document slicing of kernels.context_parallel),
decoding (fused_recurrent_kla), the span summary (chunk_kla_summary) and the float64 reference they
are tested against. No megatron import here: kla_megatron calls these, never the other way round."""

from .context_parallel import conv_halo, local_documents
from .kla import chunk_kla, chunk_kla_context_parallel, chunk_kla_summary, fused_recurrent_kla, naive_recurrent_kla

__all__ = ["chunk_kla", "chunk_kla_context_parallel", "chunk_kla_summary", "conv_halo", "fused_recurrent_kla",
           "local_documents", "naive_recurrent_kla"]
