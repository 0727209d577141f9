from .chunk import chunk_kla
from .context_parallel import chunk_kla_context_parallel
from .fused_recurrent import fused_recurrent_kla
from .naive import naive_recurrent_kla
from .summary import chunk_kla_summary

__all__ = ["chunk_kla", "chunk_kla_context_parallel", "chunk_kla_summary", "fused_recurrent_kla",
           "naive_recurrent_kla"]
