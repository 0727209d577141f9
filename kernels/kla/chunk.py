"""chunk_kla: chunkwise-parallel KLA for training and prefill (public entry point and dispatch)."""

from .chunk_torch import chunk_kla_torch
from .inputs import check_inputs, use_triton


def chunk_kla(q, k, v, g, eta, *, scale=None, eps=1e-6, initial_state=None, output_final_state=False,
              cu_seqlens=None, normalize_q=True, beta_mode="kaczmarz", backend="auto", keep_states=True):
    """Kaczmarz linear attention (docs/design.md, section 1), chunkwise parallel.

    q, k [B, T, H, K] and v [B, T, H, V] in bf16/fp16/fp32; g (log decay, <= 0) and eta (in (0, 1))
    [B, T, H], fp32. Keys are raw: their norm enters beta = eta / (||k||^2 + eps). Queries are
    divided by sqrt(||q||^2 + eps) when normalize_q. beta_mode="sigmoid" is the GDN baseline
    (keys normalised by sqrt(||k||^2 + eps), beta = eta).
    initial_state / final_state: [N, H, K, V] fp32, N = B, or the number of documents when
    cu_seqlens [N + 1] (int) packs them along T with B = 1; the state restarts at each document.
    backend: "torch" (chunkwise PyTorch, fp32), "triton" (fused kernels; CPU tensors under
    TRITON_INTERPRET=1), "auto" (triton on CUDA tensors with K, V <= 256, torch otherwise).
    keep_states (Triton): keep the forward's per-chunk states h, w and the new values vn for the backward,
    2 K + 2 V + K V / 32 bytes per token and head in bf16 (453 MB at B8 T4096 H12 K96 V192); False
    recomputes them in the backward, as fla does: less memory, two more kernels in the backward.
    Returns (o [B, T, H, V] in v's dtype, final_state or None). Differentiable in q, k, v, g, eta
    and initial_state on both backends.
    """
    check_inputs(q, k, v, g, eta, initial_state, cu_seqlens, beta_mode, backend)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    args = (q, k, v, g, eta, scale, eps, initial_state, output_final_state, cu_seqlens, normalize_q, beta_mode)
    if use_triton(backend, q, v):
        from .chunk_triton import chunk_kla_triton
        return chunk_kla_triton(*args, keep_states=keep_states)
    return chunk_kla_torch(*args)
