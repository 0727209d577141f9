"""Decode kernel: KLA token by token, one program per (value block, sequence, head) holding its
[K, BV] block of the fp32 state in registers, read once and written once per call.

    h = exp(g) h;  h += eta kk (vv - kk^T h)^T;  o = scale q^T h      (unit-key form, inputs.py)
"""

import torch
import triton
import triton.language as tl

from ..common import triton_compat  # noqa: F401  (interpreter fix, see there)


@triton.jit
def fused_recurrent_kla_fwd_kernel(q, k, v, g, eta, o, h0, ht, state_indices, cu_seqlens, T, scale, eps,
                                   H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                   BV: tl.constexpr, NORMALIZE_Q: tl.constexpr, KACZMARZ: tl.constexpr,
                                   USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                                   USE_STATE_INDICES: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n)
        seq_len = tl.load(cu_seqlens + i_n + 1) - bos
        bos = bos.to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    p_h = o_k[:, None] * V + o_v[None, :]
    if USE_STATE_INDICES:
        slot = tl.load(state_indices + i_n).to(tl.int64)
        m_h = m_h & (slot >= 0)           # a padding sequence starts from zero and stores nothing
        p_h += (tl.maximum(slot, 0) * H + i_h) * K * V
    else:
        p_h += i_nh.to(tl.int64) * K * V
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0.)
    for t in range(seq_len):
        p_token = (bos + t) * H + i_h
        b_q = tl.load(q + p_token * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_k = tl.load(k + p_token * K + o_k, mask=m_k, other=0.).to(tl.float32)
        b_v = tl.load(v + p_token * V + o_v, mask=m_v, other=0.).to(tl.float32)
        b_g = tl.load(g + p_token)
        b_eta = tl.load(eta + p_token)
        b_rk = tl.rsqrt(tl.sum(b_k * b_k, 0) + eps)
        b_kk = b_k * b_rk
        if KACZMARZ:
            b_v = b_v * b_rk
        if NORMALIZE_Q:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + eps)
        b_h *= tl.exp(b_g)
        b_error = b_v - tl.sum(b_h * b_kk[:, None], 0)
        b_h += (b_eta * b_kk)[:, None] * b_error[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(o + p_token * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + p_h, b_h, mask=m_h)


def fused_recurrent_kla_triton(q, k, v, g, eta, scale, eps, initial_state, output_final_state, cu_seqlens,
                               normalize_q, beta_mode, state_indices):
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, eta)):
        raise ValueError("the Triton decode kernel is forward-only: use chunk_kla (or backend='torch') for gradients")
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v = (x.contiguous() for x in (q, k, v))
    g, eta = g.float().contiguous(), eta.float().contiguous()
    in_place = state_indices is not None
    if initial_state is not None and not in_place:
        initial_state = initial_state.float().contiguous()
    if in_place and not initial_state.is_contiguous():
        raise ValueError("the state pool must be contiguous to be updated in place")
    o = torch.empty_like(v)
    ht = initial_state if in_place else (q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None)
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(32, triton.next_power_of_2(V)))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    if N * H * triton.cdiv(V, BV) < 2 * sms:
        BV = 16  # small batches: more, narrower programs to reach every multiprocessor
    fused_recurrent_kla_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, g, eta, o, initial_state, ht, state_indices,
        cu_seqlens.to(device=q.device, dtype=torch.int32) if cu_seqlens is not None else None, T, scale, eps,
        H=H, K=K, V=V, BK=BK, BV=BV, NORMALIZE_Q=normalize_q, KACZMARZ=beta_mode == "kaczmarz",
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=ht is not None,
        USE_STATE_INDICES=in_place, IS_VARLEN=cu_seqlens is not None)
    return o, ht
