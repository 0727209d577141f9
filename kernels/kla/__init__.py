from .chunk import chunk_kla
from .fused_recurrent import fused_recurrent_kla
from .naive import naive_recurrent_kla
from .summary import chunk_kla_summary

__all__ = ["chunk_kla", "chunk_kla_summary", "fused_recurrent_kla", "naive_recurrent_kla"]
