"""The affine summary of a span of tokens, for context parallelism (docs/design.md, section 3.5).

The state recurrence is linear in the state, so a span maps its incoming state h_in [K, V] to
    h_out = transition @ h_in + zero_start_state
with transition = prod_t alpha_t (I - eta_t kk_t kk_t^T) (K x K; the notes' M_r transposed, since
states here are K x V) and zero_start_state the span's final state from zero (the notes' N_r^T).
Both come from chunk_kla itself: the transition is the final state of a run with zero values from
the identity, so they share its kernels, varlen handling and gradients.
"""

import torch

from .chunk import chunk_kla


def chunk_kla_summary(k, v, g, eta, *, eps=1e-6, cu_seqlens=None, beta_mode="kaczmarz", backend="auto"):
    """k [B, T, H, K], v [B, T, H, V], g, eta [B, T, H] -> (transition [N, H, K, K] fp32,
    zero_start_state [N, H, K, V] fp32); N = B or the number of documents of cu_seqlens.
    Differentiable in k, v, g, eta. Queries do not enter a state, so keys stand in for them."""
    B, T, H, K = k.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    options = dict(eps=eps, output_final_state=True, cu_seqlens=cu_seqlens, beta_mode=beta_mode, backend=backend)
    _, zero_start_state = chunk_kla(k, k, v, g, eta, **options)
    identity = torch.eye(K, dtype=torch.float32, device=k.device).expand(N, H, K, K).contiguous()
    _, transition = chunk_kla(k, k, torch.zeros_like(k), g, eta, initial_state=identity, **options)
    return transition, zero_start_state
