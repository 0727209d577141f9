"""The sequential stages of chunk_kla: the state recurrence over chunks and its reverse.

One program per (value block, document, head) walks the document's chunks in order, keeping the
[K, BV] block of the fp32 state in registers.
    forward:  store h; vn = u - w h; h = exp(gl) h + (kk exp(gl - gc))^T vn
    backward: store dh (grad of the state after the chunk); dvn = dv_local + kk exp(gl - gc) dh;
              dh = exp(gl) dh + (q exp(gc))^T do - w^T dvn
"""

import triton
import triton.language as tl

from .chunk_prepare import load_unit_keys
from .sequences import BT


@triton.jit
def load_decays(gc, bos, t0, seq_len, i_h, H):
    """gc of the chunk's rows and gl, its value at the chunk's last token."""
    o_t = t0 + tl.arange(0, BT)
    b_gc = tl.load(gc + (bos + o_t) * H + i_h, mask=o_t < seq_len, other=0.)
    b_gl = tl.load(gc + (bos + tl.minimum(t0 + BT, seq_len) - 1) * H + i_h, mask=t0 < seq_len, other=0.)
    return b_gc, b_gl


@triton.jit
def load_scaled_queries(q, bos, t0, seq_len, i_h, scale, eps, H, K: tl.constexpr,
                        BK: tl.constexpr, NORMALIZE_Q: tl.constexpr):
    """scale * q / sqrt(|q|^2 + eps) (or scale * q), fp32 [BT, BK]; also q and its rsqrt norm."""
    p_q = tl.make_block_ptr(q + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    b_q = tl.load(p_q, boundary_check=(0, 1)).to(tl.float32)
    if NORMALIZE_Q:
        b_rq = tl.rsqrt(tl.sum(b_q * b_q, 1) + eps)
    else:
        b_rq = tl.full([BT], 1., dtype=tl.float32)
    return b_q * (b_rq * scale)[:, None], b_q, b_rq


@triton.jit
def chunk_kla_fwd_h_kernel(k, rk, gc, w, u, h, vn, h0, ht, cu_seqlens, chunk_offsets,
                           H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    seq_len = tl.load(cu_seqlens + i_n + 1) - bos
    bos = bos.to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    p_state = (tl.arange(0, BK)[:, None] * V + i_v * BV + tl.arange(0, BV)[None, :])
    m_state = (tl.arange(0, BK)[:, None] < K) & ((i_v * BV + tl.arange(0, BV)) < V)[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_state, mask=m_state, other=0.)
    for i_t in range(tl.cdiv(seq_len, BT)):
        t0 = i_t * BT
        tl.store(h + ((first_chunk + i_t) * H + i_h) * K * V + p_state, b_h.to(h.dtype.element_ty), mask=m_state)
        p_w = tl.make_block_ptr(w + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
        p_u = tl.make_block_ptr(u + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_vn = tl.make_block_ptr(vn + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        b_w = tl.load(p_w, boundary_check=(0, 1)).to(DOT_DTYPE)
        b_vn = tl.load(p_u, boundary_check=(0, 1)).to(tl.float32)
        b_vn -= tl.dot(b_w, b_h.to(DOT_DTYPE), input_precision=DOT_PREC)
        tl.store(p_vn, b_vn.to(p_vn.dtype.element_ty), boundary_check=(0, 1))
        b_kk = load_unit_keys(k, rk, bos, t0, seq_len, i_h, H, K, BK)
        b_gc, b_gl = load_decays(gc, bos, t0, seq_len, i_h, H)
        b_k_to_end = (b_kk * tl.exp(b_gl - b_gc)[:, None]).to(DOT_DTYPE)
        b_h = b_h * tl.exp(b_gl) + tl.dot(tl.trans(b_k_to_end), b_vn.to(DOT_DTYPE), input_precision=DOT_PREC)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_state, b_h, mask=m_state)


@triton.jit
def chunk_kla_bwd_dh_kernel(q, k, rk, gc, w, do, dv_local, dh, dvn, dht, dh0, cu_seqlens, chunk_offsets, scale, eps,
                            H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            NORMALIZE_Q: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
                            STORE_INITIAL_STATE_GRAD: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    seq_len = tl.load(cu_seqlens + i_n + 1) - bos
    bos = bos.to(tl.int64)
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    p_state = (tl.arange(0, BK)[:, None] * V + i_v * BV + tl.arange(0, BV)[None, :])
    m_state = (tl.arange(0, BK)[:, None] < K) & ((i_v * BV + tl.arange(0, BV)) < V)[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_state, mask=m_state, other=0.)
    for i_t in range(tl.cdiv(seq_len, BT) - 1, -1, -1):
        t0 = i_t * BT
        tl.store(dh + ((first_chunk + i_t) * H + i_h) * K * V + p_state, b_dh.to(dh.dtype.element_ty), mask=m_state)
        b_kk = load_unit_keys(k, rk, bos, t0, seq_len, i_h, H, K, BK)
        b_gc, b_gl = load_decays(gc, bos, t0, seq_len, i_h, H)
        p_dvl = tl.make_block_ptr(dv_local + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_dvn = tl.make_block_ptr(dvn + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_w = tl.make_block_ptr(w + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
        b_k_to_end = (b_kk * tl.exp(b_gl - b_gc)[:, None]).to(DOT_DTYPE)
        b_dvn = tl.load(p_dvl, boundary_check=(0, 1)).to(tl.float32)
        b_dvn += tl.dot(b_k_to_end, b_dh.to(DOT_DTYPE), input_precision=DOT_PREC)
        tl.store(p_dvn, b_dvn.to(p_dvn.dtype.element_ty), boundary_check=(0, 1))
        b_qs, _, _ = load_scaled_queries(q, bos, t0, seq_len, i_h, scale, eps, H, K, BK, NORMALIZE_Q)
        b_q_decayed = (b_qs * tl.exp(b_gc)[:, None]).to(DOT_DTYPE)
        b_do = tl.load(p_do, boundary_check=(0, 1)).to(DOT_DTYPE)
        b_w = tl.load(p_w, boundary_check=(0, 1)).to(DOT_DTYPE)
        b_dh = (b_dh * tl.exp(b_gl) + tl.dot(tl.trans(b_q_decayed), b_do, input_precision=DOT_PREC)
                - tl.dot(tl.trans(b_w), b_dvn.to(DOT_DTYPE), input_precision=DOT_PREC))
    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_state, b_dh, mask=m_state)
