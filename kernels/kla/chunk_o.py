"""The per-chunk output stages of chunk_kla and their backward.

    o = (qs exp(gc)) h + P vn,   P = lower_incl(S_ij exp(gc_i - gc_j)),   S_ij = <qs_i, kk_j>
with qs = scale rq q and kk = rk k; S is formed as <q_i, k_j> scaled by (scale rq_i) rk_j.
"""

import triton
import triton.language as tl

from .sequences import BT, chunk_position, load_rows, load_tokens, row_block


@triton.jit
def chunk_scores(q, k, rk, rq, gc, bos, t0, seq_len, i_h, scale, H, K: tl.constexpr, BK: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """The chunk's q, k (as product operands), gc, scale rq, rk, S and the causal decay exp(gc_i - gc_j)."""
    o_t = t0 + tl.arange(0, BT)
    b_q = load_rows(q, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
    b_k = load_rows(k, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
    b_gc = load_tokens(gc, bos, o_t, seq_len, i_h, H)
    b_qscale = load_tokens(rq, bos, o_t, seq_len, i_h, H) * scale
    b_rk = load_tokens(rk, bos, o_t, seq_len, i_h, H)
    b_S = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * b_qscale[:, None] * b_rk[None, :]
    m_causal = (o_t[:, None] >= o_t[None, :]) & (o_t < seq_len)[:, None]
    b_decay = tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], float("-inf")))
    return b_q, b_k, b_gc, b_qscale, b_rk, b_S, b_decay


@triton.jit
def chunk_kla_fwd_o_kernel(q, k, rk, rq, gc, h, vn, o, cu_seqlens, chunk_indices, scale,
                           H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per (chunk x value block, head); S is recomputed per value block (a chunk's value
    blocks run side by side, so q and k come from L2 after the first)."""
    i_c, i_v, i_h = tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(1)
    bos, seq_len, t0, _ = chunk_position(cu_seqlens, chunk_indices, i_c)
    b_q, _, b_gc, b_qscale, _, b_S, b_decay = chunk_scores(q, k, rk, rq, gc, bos, t0, seq_len, i_h, scale, H, K, BK,
                                                           DOT_DTYPE, DOT_PREC)
    p_h = tl.make_block_ptr(h + (i_c * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV), (BK, BV), (1, 0))
    b_h = tl.load(p_h, boundary_check=(0, 1)).to(DOT_DTYPE)
    b_vn = tl.load(row_block(vn, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1)).to(DOT_DTYPE)
    b_o = (tl.dot(b_q, b_h, input_precision=DOT_PREC) * (b_qscale * tl.exp(b_gc))[:, None]
           + tl.dot((b_S * b_decay).to(DOT_DTYPE), b_vn, input_precision=DOT_PREC))
    tl.store(row_block(o, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), b_o.to(o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_kla_bwd_dv_local_kernel(q, k, rk, rq, gc, do, dv_local, cu_seqlens, chunk_indices, scale,
                                  H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                  BV: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """dvn from the outputs of its own chunk: P^T do; one program per (chunk x value block, head)."""
    i_c, i_v, i_h = tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(1)
    bos, seq_len, t0, _ = chunk_position(cu_seqlens, chunk_indices, i_c)
    _, _, _, _, _, b_S, b_decay = chunk_scores(q, k, rk, rq, gc, bos, t0, seq_len, i_h, scale, H, K, BK,
                                               DOT_DTYPE, DOT_PREC)
    b_do = tl.load(row_block(do, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1)).to(DOT_DTYPE)
    b_dv = tl.dot(tl.trans((b_S * b_decay).to(DOT_DTYPE)), b_do, input_precision=DOT_PREC)
    tl.store(row_block(dv_local, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), b_dv.to(dv_local.dtype.element_ty),
             boundary_check=(0, 1))


@triton.jit
def chunk_kla_bwd_dqkg_kernel(q, k, rk, rq, gc, h, vn, do, dh, dvn, dq, dkk, dgc, dw, cu_seqlens, chunk_indices,
                               scale, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                               BV: tl.constexpr, NORMALIZE_Q: tl.constexpr, DOT_DTYPE: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    """dq (final), the parts of dkk, dgc that do not pass through the WY stage, and dw = -dvn h^T
    (vn = u - w h) for chunk_kla_bwd_prepare, as h is read here anyway.
    h is the state before the chunk, dh the gradient of the state after it."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, seq_len, t0, o_t = chunk_position(cu_seqlens, chunk_indices, i_c)
    m_t = o_t < seq_len
    b_do_h = tl.zeros([BT, BK], dtype=tl.float32)      # do h^T
    b_do_vn = tl.zeros([BT, BT], dtype=tl.float32)     # do vn^T
    b_vn_dh = tl.zeros([BT, BK], dtype=tl.float32)     # vn dh^T
    b_h_dh = 0.                                        # sum of h * dh
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)        # -dvn h^T
    p_h = tl.make_block_ptr(h + (i_c * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, 0), (BK, BV), (1, 0))
    p_dh = tl.make_block_ptr(dh + (i_c * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, 0), (BK, BV), (1, 0))
    for i_v in range(tl.cdiv(V, BV)):
        b_h = tl.load(tl.advance(p_h, (0, i_v * BV)), boundary_check=(0, 1))
        b_dh = tl.load(tl.advance(p_dh, (0, i_v * BV)), boundary_check=(0, 1))
        b_vn = tl.load(row_block(vn, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1)).to(DOT_DTYPE)
        b_do = tl.load(row_block(do, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1)).to(DOT_DTYPE)
        b_dvn = tl.load(row_block(dvn, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1))
        b_do_h += tl.dot(b_do, tl.trans(b_h.to(DOT_DTYPE)), input_precision=DOT_PREC)
        b_dw -= tl.dot(b_dvn.to(DOT_DTYPE), tl.trans(b_h.to(DOT_DTYPE)), input_precision=DOT_PREC)
        b_do_vn += tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PREC)
        b_vn_dh += tl.dot(b_vn, tl.trans(b_dh.to(DOT_DTYPE)), input_precision=DOT_PREC)
        b_h_dh += tl.sum(tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1), 0)

    tl.store(row_block(dw, bos, t0, seq_len, i_h, H, K, 0, BK), b_dw.to(dw.dtype.element_ty), boundary_check=(0, 1))

    # loaded after the loop, so these tiles take no registers during it
    b_q, b_k, b_gc, b_qscale, b_rk, b_S, b_decay = chunk_scores(q, k, rk, rq, gc, bos, t0, seq_len, i_h, scale, H,
                                                                 K, BK, DOT_DTYPE, DOT_PREC)
    b_gl = tl.load(gc + (bos + tl.minimum(t0 + BT, seq_len) - 1) * H + i_h, mask=t0 < seq_len, other=0.)
    b_dS = b_do_vn * b_decay                           # grad of S_ij on j <= i
    b_dqs_inter = b_do_h * tl.exp(b_gc)[:, None]
    b_dqs = b_dqs_inter + tl.dot((b_dS * b_rk[None, :]).to(DOT_DTYPE), b_k, input_precision=DOT_PREC)
    b_dkk_state = b_vn_dh * tl.exp(b_gl - b_gc)[:, None]
    b_dkk = tl.dot(tl.trans((b_dS * b_qscale[:, None]).to(DOT_DTYPE)), b_q, input_precision=DOT_PREC) + b_dkk_state
    # log-decay gradient, before the chunk-local reverse cumsum
    b_dS_S = b_dS * b_S
    b_kk_dkk_state = tl.sum(b_k.to(tl.float32) * b_dkk_state, 1) * b_rk
    b_qf = b_q.to(tl.float32)
    b_dgc = tl.sum(b_dqs_inter * b_qf, 1) * b_qscale + tl.sum(b_dS_S, 1) - tl.sum(b_dS_S, 0) - b_kk_dkk_state
    b_dgl = b_h_dh * tl.exp(b_gl) + tl.sum(b_kk_dkk_state, 0)
    b_dgc += tl.where(o_t == tl.minimum(t0 + BT, seq_len) - 1, b_dgl, 0.)

    # qs = scale * q * rq, rq = (|q|^2 + eps)^-1/2
    if NORMALIZE_Q:
        b_rq = b_qscale / scale
        b_dq = b_qscale[:, None] * (b_dqs - b_qf * (tl.sum(b_qf * b_dqs, 1) * b_rq * b_rq)[:, None])
    else:
        b_dq = scale * b_dqs
    tl.store(row_block(dq, bos, t0, seq_len, i_h, H, K, 0, BK), b_dq.to(dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(row_block(dkk, bos, t0, seq_len, i_h, H, K, 0, BK), b_dkk, boundary_check=(0, 1))
    tl.store(dgc + (bos + o_t) * H + i_h, b_dgc, mask=m_t)
