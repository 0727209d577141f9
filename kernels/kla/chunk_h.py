"""The sequential stages of chunk_kla: the state recurrence over chunks and its reverse.

One program per (value block, document, head) walks the document's chunks in order, keeping the
[K, BV] block of the fp32 state in registers. With d = rk exp(gl - gc) per token (kk = k rk):
    forward:  store h; vn = u - w h; h = exp(gl) h + k^T (d vn)
    backward: store dh (grad of the state after the chunk); dvn = dv_local + d (k dh);
              dh = exp(gl) dh + q^T (rq scale exp(gc) do) - w^T dvn
(Computing the outputs or dv_local inside these walks was measured slower: the walk is latency-bound,
and the extra products lengthen every step.)
Keys and queries enter the products as stored; the per-token factors scale the [BT, BV] side.
"""

import triton
import triton.language as tl

from .sequences import BT, load_rows, load_tokens, row_block


@triton.jit
def document_walk(cu_seqlens, chunk_offsets, i_v, i_nh, H, K: tl.constexpr, V: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr):
    """Where the program's document lies, and the offsets and mask of its [BK, BV] state block."""
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    seq_len = tl.load(cu_seqlens + i_n + 1) - bos
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    p_state = tl.arange(0, BK)[:, None] * V + i_v * BV + tl.arange(0, BV)[None, :]
    m_state = (tl.arange(0, BK)[:, None] < K) & ((i_v * BV + tl.arange(0, BV)) < V)[None, :]
    return i_h, bos.to(tl.int64), seq_len, first_chunk, p_state, m_state


@triton.jit
def chunk_decays(gc, rk, bos, t0, seq_len, i_h, H):
    """gc of the chunk's rows, gl (its value at the chunk's last token), and d = rk exp(gl - gc)."""
    o_t = t0 + tl.arange(0, BT)
    b_gc = load_tokens(gc, bos, o_t, seq_len, i_h, H)
    b_gl = tl.load(gc + (bos + tl.minimum(t0 + BT, seq_len) - 1) * H + i_h, mask=t0 < seq_len, other=0.)
    return b_gc, b_gl, load_tokens(rk, bos, o_t, seq_len, i_h, H) * tl.exp(b_gl - b_gc)


@triton.jit
def chunk_kla_fwd_h_kernel(k, rk, gc, w, u, h, vn, h0, ht, cu_seqlens, chunk_offsets,
                           H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, seq_len, first_chunk, p_state, m_state = document_walk(cu_seqlens, chunk_offsets, i_v, i_nh, H, K, V,
                                                                     BK, BV)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_state, mask=m_state, other=0.)
    for i_t in range(tl.cdiv(seq_len, BT)):
        t0 = i_t * BT
        tl.store(h + ((first_chunk + i_t) * H + i_h) * K * V + p_state, b_h.to(h.dtype.element_ty), mask=m_state)
        b_w = load_rows(w, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        b_vn = tl.load(row_block(u, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1)).to(tl.float32)
        b_vn -= tl.dot(b_w, b_h.to(DOT_DTYPE), input_precision=DOT_PREC)
        tl.store(row_block(vn, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), b_vn.to(vn.dtype.element_ty),
                 boundary_check=(0, 1))
        b_k = load_rows(k, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        b_gc, b_gl, b_d = chunk_decays(gc, rk, bos, t0, seq_len, i_h, H)
        b_h = b_h * tl.exp(b_gl) + tl.dot(tl.trans(b_k), (b_vn * b_d[:, None]).to(DOT_DTYPE), input_precision=DOT_PREC)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_state, b_h, mask=m_state)


@triton.jit
def chunk_kla_bwd_dh_kernel(q, k, rk, rq, gc, w, do, dv_local, dh, dvn, dht, dh0, cu_seqlens, chunk_offsets, scale,
                            H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            USE_FINAL_STATE_GRAD: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, seq_len, first_chunk, p_state, m_state = document_walk(cu_seqlens, chunk_offsets, i_v, i_nh, H, K, V,
                                                                     BK, BV)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_state, mask=m_state, other=0.)
    for i_t in range(tl.cdiv(seq_len, BT) - 1, -1, -1):
        t0 = i_t * BT
        tl.store(dh + ((first_chunk + i_t) * H + i_h) * K * V + p_state, b_dh.to(dh.dtype.element_ty), mask=m_state)
        b_k = load_rows(k, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        b_gc, b_gl, b_d = chunk_decays(gc, rk, bos, t0, seq_len, i_h, H)
        b_dvn = tl.load(row_block(dv_local, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1))
        b_dvn = b_dvn.to(tl.float32) + tl.dot(b_k, b_dh.to(DOT_DTYPE), input_precision=DOT_PREC) * b_d[:, None]
        tl.store(row_block(dvn, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), b_dvn.to(dvn.dtype.element_ty),
                 boundary_check=(0, 1))
        b_q = load_rows(q, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        b_do = tl.load(row_block(do, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1))
        b_q_scale = load_tokens(rq, bos, t0 + tl.arange(0, BT), seq_len, i_h, H) * scale * tl.exp(b_gc)
        b_w = load_rows(w, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        b_dh = (b_dh * tl.exp(b_gl)
                + tl.dot(tl.trans(b_q), (b_do.to(tl.float32) * b_q_scale[:, None]).to(DOT_DTYPE), input_precision=DOT_PREC)
                - tl.dot(tl.trans(b_w), b_dvn.to(DOT_DTYPE), input_precision=DOT_PREC))
    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_state, b_dh, mask=m_state)
