"""Argument checking and the shared reading of KLA's per-token coefficients.

Every backend (float64 reference, chunkwise torch, Triton) runs the same recurrence. They all rely
on the equivalence of docs/design.md (section 1.3), written here with the eps kept exact: with rk = (||k||^2 + eps)^-1/2
and kk = k * rk (a key of norm < 1),

    kaczmarz: beta k k^T = eta kk kk^T,   beta v k^T = eta (v * rk) kk^T
    sigmoid:  GDN with keys kk and beta = eta, values as given

so both modes are the gated delta rule on keys kk with step eta; KLA only scales the values by rk.
The transition I - eta kk kk^T is a contraction for any key scale, which keeps every path finite.
"""

import torch

from ..common import inputs as common

BETA_MODES = ("kaczmarz", "sigmoid")
MAX_HEAD_DIM = 256


def check_inputs(q, k, v, g, eta, initial_state, cu_seqlens, beta_mode, backend, state_indices=None):
    """Raise ValueError with a plain message when the arguments do not fit together."""
    if beta_mode not in BETA_MODES:
        raise ValueError(f"beta_mode must be one of {BETA_MODES}, got {beta_mode!r}")
    common.check_backend(backend)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = k.shape
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {(B, T, H)} of k; got {tuple(v.shape)}")
    for name, x in (("g", g), ("eta", eta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}; got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (fp32 preferred), got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype out of fp32/bf16/fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    N = common.check_cu_seqlens(cu_seqlens, B)
    V = v.shape[-1]
    if initial_state is not None and state_indices is None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state must be [N, H, K, V] = {(N, H, K, V)}; got {tuple(initial_state.shape)}")
    if state_indices is not None:
        if initial_state is None:
            raise ValueError("state_indices selects slots of initial_state, which must then be given")
        if initial_state.dim() != 4 or initial_state.shape[1:] != (H, K, V) or initial_state.dtype != torch.float32:
            raise ValueError(f"with state_indices, initial_state is an fp32 pool [slots, H, K, V] = [*, {H}, {K}, {V}]; "
                             f"got {tuple(initial_state.shape)} {initial_state.dtype}")
        if state_indices.shape != (N,) or state_indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"state_indices must be an int tensor [N] = [{N}]; got {tuple(state_indices.shape)} "
                             f"{state_indices.dtype}")


def use_triton(backend, q, v):
    """The backend that runs (kernels/common/inputs.py); the Triton kernels take head dims up to 256."""
    fits = max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
    return common.use_triton(backend, q, None if fits else f"the Triton kernels support head dims up to {MAX_HEAD_DIM}")


def unit_keys_and_values(k, v, eps, beta_mode):
    """GDN form of both modes (module docstring): keys kk = k rk, values v * rk (kaczmarz) or v (sigmoid)."""
    rk = torch.rsqrt(k.square().sum(-1, keepdim=True) + eps)
    kk = k * rk
    vv = v * rk if beta_mode == "kaczmarz" else v
    return kk, vv


def normalized_queries(q, eps, normalize_q):
    return q * torch.rsqrt(q.square().sum(-1, keepdim=True) + eps) if normalize_q else q
