"""The affine summary of a span of tokens (the first half of context parallelism, spans.py).

The recurrence is affine in the state a document starts from, so a span maps h_in [K, V] to
    h_out = transition @ h_in + zero_start_state
with transition = prod_t alpha_t (I - eta_t kk_t kk_t^T) (K x K, acting on states stored K x V) and
zero_start_state the final state from zero. Both come from one run of the span: on the Triton path
fwd_h walks the transitions beside the states in the same launch.
"""

import torch

from .inputs import check_inputs, use_triton
from .spans import TorchSpan, TritonSpan


def chunk_kla_summary(k, v, g, eta, *, eps=1e-6, cu_seqlens=None, beta_mode="kaczmarz", backend="auto"):
    """k [B, T, H, K], v [B, T, H, V], g, eta [B, T, H] -> (transition [N, H, K, K] fp32,
    zero_start_state [N, H, K, V] fp32); N = B or the number of documents of cu_seqlens. Not
    differentiable: chunk_kla_context_parallel differentiates through the exchange itself."""
    check_inputs(k, k, v, g, eta, None, cu_seqlens, beta_mode, backend)
    span_type = TritonSpan if use_triton(backend, k, v) else TorchSpan
    k, _, v, g, eta = span_type.prepare(k, k, v, g, eta)
    with torch.no_grad():
        # queries do not enter a state: keys stand in for them
        span = span_type(k, k, v, g, eta, 1.0, eps, cu_seqlens, False, beta_mode, False)
        zero_start_state, transition = span.summary((0, span.num_seqs))
    return transition, zero_start_state
