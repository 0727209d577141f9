"""The per-chunk output stages of chunk_kla and their backward, one program per (chunk, head).

    o = (qs exp(gc)) h + P vn,   P = lower_incl(<qs_i, kk_j> exp(gc_i - gc_j)),   qs = scale * q / |q|
"""

import triton
import triton.language as tl

from .chunk_h import load_decays, load_scaled_queries
from .chunk_prepare import load_unit_keys
from .sequences import BT, chunk_position


@triton.jit
def _intra_chunk_scores(b_qs, b_kk, b_gc, o_t, seq_len, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """P = <qs_i, kk_j> exp(gc_i - gc_j) for j <= i (zero elsewhere), and the causal decay alone."""
    m_causal = (o_t[:, None] >= o_t[None, :]) & (o_t < seq_len)[:, None]
    b_decay = tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], float("-inf")))
    b_scores = tl.dot(b_qs.to(DOT_DTYPE), tl.trans(b_kk.to(DOT_DTYPE)), input_precision=DOT_PREC)
    return b_scores * b_decay, b_decay, b_scores


@triton.jit
def chunk_kla_fwd_o_kernel(q, k, rk, gc, h, vn, o, cu_seqlens, chunk_indices, scale, eps,
                           H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           NORMALIZE_Q: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_c)
    t0 = i_t * BT
    o_t = t0 + tl.arange(0, BT)
    b_qs, _, _ = load_scaled_queries(q, bos, t0, seq_len, i_h, scale, eps, H, K, BK, NORMALIZE_Q)
    b_kk = load_unit_keys(k, rk, bos, t0, seq_len, i_h, H, K, BK)
    b_gc, _ = load_decays(gc, bos, t0, seq_len, i_h, H)
    b_P, _, _ = _intra_chunk_scores(b_qs, b_kk, b_gc, o_t, seq_len, DOT_DTYPE, DOT_PREC)
    b_P = b_P.to(DOT_DTYPE)
    b_q_decayed = (b_qs * tl.exp(b_gc)[:, None]).to(DOT_DTYPE)
    p_h = tl.make_block_ptr(h + (i_c * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, 0), (BK, BV), (1, 0))
    for i_v in range(tl.cdiv(V, BV)):
        p_vn = tl.make_block_ptr(vn + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_o = tl.make_block_ptr(o + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        b_h = tl.load(tl.advance(p_h, (0, i_v * BV)), boundary_check=(0, 1)).to(DOT_DTYPE)
        b_vn = tl.load(p_vn, boundary_check=(0, 1)).to(DOT_DTYPE)
        b_o = tl.dot(b_q_decayed, b_h, input_precision=DOT_PREC) + tl.dot(b_P, b_vn, input_precision=DOT_PREC)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_kla_bwd_dv_local_kernel(q, k, rk, gc, do, dv_local, cu_seqlens, chunk_indices, scale, eps,
                                  H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                  BV: tl.constexpr, NORMALIZE_Q: tl.constexpr, DOT_DTYPE: tl.constexpr,
                                  DOT_PREC: tl.constexpr):
    """dvn from the outputs of its own chunk: P^T do."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_c)
    t0 = i_t * BT
    o_t = t0 + tl.arange(0, BT)
    b_qs, _, _ = load_scaled_queries(q, bos, t0, seq_len, i_h, scale, eps, H, K, BK, NORMALIZE_Q)
    b_kk = load_unit_keys(k, rk, bos, t0, seq_len, i_h, H, K, BK)
    b_gc, _ = load_decays(gc, bos, t0, seq_len, i_h, H)
    b_P, _, _ = _intra_chunk_scores(b_qs, b_kk, b_gc, o_t, seq_len, DOT_DTYPE, DOT_PREC)
    b_Pt = tl.trans(b_P.to(DOT_DTYPE))
    for i_v in range(tl.cdiv(V, BV)):
        p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_dv = tl.make_block_ptr(dv_local + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        b_do = tl.load(p_do, boundary_check=(0, 1)).to(DOT_DTYPE)
        tl.store(p_dv, tl.dot(b_Pt, b_do, input_precision=DOT_PREC).to(p_dv.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_kla_bwd_dqkg_kernel(q, k, rk, gc, h, vn, do, dh, dq, dkk, dgc, cu_seqlens, chunk_indices,
                               scale, eps, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                               BV: tl.constexpr, NORMALIZE_Q: tl.constexpr, DOT_DTYPE: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    """dq (final), and the parts of dkk, dgc that do not pass through the WY stage.
    h is the state before the chunk, dh the gradient of the state after it."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_c)
    t0 = i_t * BT
    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < seq_len
    b_do_h = tl.zeros([BT, BK], dtype=tl.float32)      # do h^T
    b_do_vn = tl.zeros([BT, BT], dtype=tl.float32)     # do vn^T
    b_vn_dh = tl.zeros([BT, BK], dtype=tl.float32)     # vn dh^T
    b_h_dh = 0.                                        # sum of h * dh
    p_h = tl.make_block_ptr(h + (i_c * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, 0), (BK, BV), (1, 0))
    p_dh = tl.make_block_ptr(dh + (i_c * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, 0), (BK, BV), (1, 0))
    for i_v in range(tl.cdiv(V, BV)):
        p_vn = tl.make_block_ptr(vn + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_do = tl.make_block_ptr(do + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        b_h = tl.load(tl.advance(p_h, (0, i_v * BV)), boundary_check=(0, 1))
        b_dh = tl.load(tl.advance(p_dh, (0, i_v * BV)), boundary_check=(0, 1))
        b_vn = tl.load(p_vn, boundary_check=(0, 1)).to(DOT_DTYPE)
        b_do = tl.load(p_do, boundary_check=(0, 1)).to(DOT_DTYPE)
        b_do_h += tl.dot(b_do, tl.trans(b_h.to(DOT_DTYPE)), input_precision=DOT_PREC)
        b_do_vn += tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PREC)
        b_vn_dh += tl.dot(b_vn, tl.trans(b_dh.to(DOT_DTYPE)), input_precision=DOT_PREC)
        b_h_dh += tl.sum(tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1), 0)

    # loaded after the loop, so these tiles take no registers during it
    b_qs, b_q, b_rq = load_scaled_queries(q, bos, t0, seq_len, i_h, scale, eps, H, K, BK, NORMALIZE_Q)
    b_kk = load_unit_keys(k, rk, bos, t0, seq_len, i_h, H, K, BK)
    b_gc, b_gl = load_decays(gc, bos, t0, seq_len, i_h, H)
    b_P, b_decay, b_scores = _intra_chunk_scores(b_qs, b_kk, b_gc, o_t, seq_len, DOT_DTYPE, DOT_PREC)
    b_dscores = b_do_vn * b_decay                      # grad of <qs_i, kk_j> on j <= i
    b_dqs_inter = b_do_h * tl.exp(b_gc)[:, None]
    b_dqs = b_dqs_inter + tl.dot(b_dscores.to(DOT_DTYPE), b_kk.to(DOT_DTYPE), input_precision=DOT_PREC)
    b_k_to_end = tl.exp(b_gl - b_gc)
    b_dkk_state = b_vn_dh * b_k_to_end[:, None]
    b_dkk = tl.dot(tl.trans(b_dscores.to(DOT_DTYPE)), b_qs.to(DOT_DTYPE), input_precision=DOT_PREC) + b_dkk_state
    # log-decay gradient, before the chunk-local reverse cumsum
    b_dP_P = b_dscores * b_scores
    b_kk_dkk_state = tl.sum(b_kk * b_dkk_state, 1)
    b_dgc = tl.sum(b_dqs_inter * b_qs, 1) + tl.sum(b_dP_P, 1) - tl.sum(b_dP_P, 0) - b_kk_dkk_state
    b_dgl = b_h_dh * tl.exp(b_gl) + tl.sum(b_kk_dkk_state, 0)
    b_dgc += tl.where(o_t == tl.minimum(t0 + BT, seq_len) - 1, b_dgl, 0.)

    # qs = scale * q * rq, rq = (|q|^2 + eps)^-1/2
    if NORMALIZE_Q:
        b_dq = scale * b_rq[:, None] * (b_dqs - b_q * (tl.sum(b_q * b_dqs, 1) * b_rq * b_rq)[:, None])
    else:
        b_dq = scale * b_dqs
    p_dq = tl.make_block_ptr(dq + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    p_dkk = tl.make_block_ptr(dkk + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(p_dkk, b_dkk, boundary_check=(0, 1))
    tl.store(dgc + (bos + o_t) * H + i_h, b_dgc, mask=m_t)
