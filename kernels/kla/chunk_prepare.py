"""Per-chunk preparation of chunk_kla and its backward (the WY/UT stages of chunk_torch.py).

Forward, one program per (chunk, head): cumulative log decay gc, key norm rk = (|k|^2+eps)^-1/2,
unit keys kk = k rk, the strictly lower L = beta_i <kk_i, kk_j> exp(gc_i - gc_j), its inverse
Ainv = (I + L)^-1, and w = Ainv (beta exp(gc) kk), u = Ainv (beta vv) with vv = v rk (kaczmarz)
or v (sigmoid). Backward reverses these stages and the key/value normalisation in one program.
"""

import triton
import triton.language as tl

from .sequences import BT, chunk_position


@triton.jit
def invert_unit_lower(b_L, DOT_PREC: tl.constexpr):
    """(I + L)^-1 of a strictly lower 64 x 64 L held in registers (fp32).

    The four 16 x 16 diagonal blocks are inverted together by forward substitution (16 steps on a
    [4, 16, 16] tile); substitution keeps every intermediate as small as the inverse itself, where
    squaring tricks on L would cancel large terms. With D that block-diagonal inverse and F the part
    of L below the diagonal blocks, I + L = (I + Lbd)(I + D F), and N = D F is block-nilpotent of
    order 4, so (I + L)^-1 = (I - N)(I + N^2) D: four 64 x 64 tensor-core products.
    """
    o_r = tl.arange(0, 64)
    same_block = (o_r[:, None] // 16) == (o_r[None, :] // 16)
    # diagonal blocks as [4, 16, 16]: [b, i, j] = L[16 b + i, 16 b + j]
    b_D = tl.sum(tl.reshape(tl.where(same_block, b_L, 0.), (4, 16, 4, 16)), 2)
    o_i = tl.arange(0, 16)[None, :, None]
    b_inv = -b_D
    for i in range(1, 16):
        # row i of each block's strict inverse: -L_i - L_i @ (rows above, already final)
        b_a = tl.sum(tl.where(o_i == i, b_inv, 0.), 1)
        b_a += tl.sum(b_a[:, :, None] * b_inv, 1)
        b_inv = tl.where(o_i == i, b_a[:, None, :], b_inv)
    b_inv += tl.where(o_i == tl.arange(0, 16)[None, None, :], 1., 0.)
    # back to [64, 64], zero off the diagonal blocks
    o_b = tl.arange(0, 4)
    b_inv4 = tl.broadcast_to(b_inv[:, :, None, :], (4, 16, 4, 16))
    b_Dinv = tl.reshape(tl.where((o_b[:, None, None, None] == o_b[None, None, :, None]), b_inv4, 0.), (64, 64))
    eye = tl.where(o_r[:, None] == o_r[None, :], 1., 0.)
    b_N = tl.dot(b_Dinv, tl.where(same_block, 0., b_L), input_precision=DOT_PREC)
    b_N2 = tl.dot(b_N, b_N, input_precision=DOT_PREC)
    b_P = eye - b_N + b_N2 - tl.dot(b_N, b_N2, input_precision=DOT_PREC)
    return tl.dot(b_P, b_Dinv, input_precision=DOT_PREC)


@triton.jit
def load_unit_keys(k, rk, bos, t0, seq_len, i_h, H, K: tl.constexpr, BK: tl.constexpr):
    """kk = k * rk for the chunk's rows (zero beyond the sequence), fp32 [BT, BK]."""
    p_k = tl.make_block_ptr(k + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    b_k = tl.load(p_k, boundary_check=(0, 1)).to(tl.float32)
    o_t = t0 + tl.arange(0, BT)
    b_rk = tl.load(rk + (bos + o_t) * H + i_h, mask=o_t < seq_len, other=0.)
    return b_k * b_rk[:, None]


@triton.jit
def chunk_kla_fwd_prepare_kernel(k, v, g, eta, gc, rk, Ainv, w, u, cu_seqlens, chunk_indices, eps,
                                 H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                 BV: tl.constexpr, KACZMARZ: tl.constexpr, STORE_AINV: tl.constexpr,
                                 DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_c)
    t0 = i_t * BT
    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < seq_len
    p_scalar = (bos + o_t) * H + i_h
    b_gc = tl.cumsum(tl.load(g + p_scalar, mask=m_t, other=0.), 0)
    b_beta = tl.load(eta + p_scalar, mask=m_t, other=0.)
    tl.store(gc + p_scalar, b_gc, mask=m_t)

    p_k = tl.make_block_ptr(k + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    b_k = tl.load(p_k, boundary_check=(0, 1)).to(tl.float32)
    b_rk = tl.rsqrt(tl.sum(b_k * b_k, 1) + eps)
    tl.store(rk + p_scalar, b_rk, mask=m_t)
    b_kk = (b_k * b_rk[:, None]).to(DOT_DTYPE)

    # L = beta_i <kk_i, kk_j> exp(gc_i - gc_j), strictly lower
    m_lower = (o_t[:, None] > o_t[None, :]) & m_t[:, None]
    b_L = tl.dot(b_kk, tl.trans(b_kk), input_precision=DOT_PREC)
    b_L *= b_beta[:, None] * tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], float("-inf")))
    b_Ai = invert_unit_lower(b_L, DOT_PREC)
    if STORE_AINV:  # for the backward; the forward alone needs only w and u
        p_A = Ainv + (bos + o_t[:, None]) * (H * BT) + i_h * BT + tl.arange(0, BT)[None, :]
        tl.store(p_A, b_Ai, mask=m_t[:, None])
    b_Ai = b_Ai.to(DOT_DTYPE)

    b_w = tl.dot(b_Ai, (b_kk * (b_beta * tl.exp(b_gc))[:, None]).to(DOT_DTYPE), input_precision=DOT_PREC)
    p_w = tl.make_block_ptr(w + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    tl.store(p_w, b_w.to(p_w.dtype.element_ty), boundary_check=(0, 1))
    b_value_scale = b_beta * b_rk if KACZMARZ else b_beta
    for i_v in range(tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_u = tl.make_block_ptr(u + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        b_v = tl.load(p_v, boundary_check=(0, 1)).to(tl.float32) * b_value_scale[:, None]
        b_u = tl.dot(b_Ai, b_v.to(DOT_DTYPE), input_precision=DOT_PREC)
        tl.store(p_u, b_u.to(p_u.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_kla_bwd_prepare_kernel(k, v, eta, gc, rk, Ainv, h, du, dkk, dgc, dk, dv, deta, dg, cu_seqlens,
                                 chunk_indices, H, K: tl.constexpr, V: tl.constexpr,
                                 BK: tl.constexpr, BV: tl.constexpr, KACZMARZ: tl.constexpr,
                                 DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """From du (= dvn), the state h before the chunk and the partial dkk, dgc of chunk_kla_bwd_dqkg:
    dk, dv, deta, dg. dw = -du h^T (vn = u - w h) is formed here, where few registers are in use."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_c)
    t0 = i_t * BT
    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < seq_len
    p_scalar = (bos + o_t) * H + i_h
    b_gc = tl.load(gc + p_scalar, mask=m_t, other=0.)
    b_beta = tl.load(eta + p_scalar, mask=m_t, other=0.)
    b_rk = tl.load(rk + p_scalar, mask=m_t, other=0.)
    p_A = Ainv + (bos + o_t[:, None]) * (H * BT) + i_h * BT + tl.arange(0, BT)[None, :]
    b_Ai = tl.load(p_A, mask=m_t[:, None], other=0.).to(DOT_DTYPE)

    # u = Ainv Xu, Xu = beta vv; vv = v rk (kaczmarz) or v. Values first: few registers live here.
    b_value_scale = b_beta * b_rk if KACZMARZ else b_beta
    b_dAi = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_v_dvv = tl.zeros([BT], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    p_h = tl.make_block_ptr(h + (i_c * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, 0), (BK, BV), (1, 0))
    for i_v in range(tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_du = tl.make_block_ptr(du + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        p_dv = tl.make_block_ptr(dv + (bos * H + i_h) * V, (seq_len, V), (H * V, 1), (t0, i_v * BV), (BT, BV), (1, 0))
        b_v = tl.load(p_v, boundary_check=(0, 1)).to(tl.float32)
        b_du = tl.load(p_du, boundary_check=(0, 1)).to(DOT_DTYPE)
        b_dXu = tl.dot(tl.trans(b_Ai), b_du, input_precision=DOT_PREC)
        b_dw -= tl.dot(b_du, tl.trans(tl.load(tl.advance(p_h, (0, i_v * BV)), boundary_check=(0, 1)).to(DOT_DTYPE)),
                       input_precision=DOT_PREC)
        b_dAi += tl.dot(b_du, tl.trans((b_v * b_value_scale[:, None]).to(DOT_DTYPE)), input_precision=DOT_PREC)
        b_v_dXu = tl.sum(b_v * b_dXu, 1)
        b_dbeta += b_v_dXu * (b_rk if KACZMARZ else 1.)
        b_v_dvv += b_v_dXu * b_beta
        tl.store(p_dv, (b_dXu * b_value_scale[:, None]).to(p_dv.dtype.element_ty), boundary_check=(0, 1))

    # w = Ainv Xw, Xw = beta exp(gc) kk
    b_kk = load_unit_keys(k, rk, bos, t0, seq_len, i_h, H, K, BK)
    b_kk_dot = b_kk.to(DOT_DTYPE)
    b_dw = b_dw.to(DOT_DTYPE)
    b_step = b_beta * tl.exp(b_gc)
    b_dXw = tl.dot(tl.trans(b_Ai), b_dw, input_precision=DOT_PREC)
    b_dAi += tl.dot(b_dw, tl.trans((b_kk * b_step[:, None]).to(DOT_DTYPE)), input_precision=DOT_PREC)
    p_dkk = tl.make_block_ptr(dkk + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    b_dkk = tl.load(p_dkk, boundary_check=(0, 1)) + b_dXw * b_step[:, None]
    b_kk_dXw = tl.sum(b_kk * b_dXw, 1) * tl.exp(b_gc)
    b_dbeta += b_kk_dXw
    b_dgc = tl.load(dgc + p_scalar, mask=m_t, other=0.) + b_kk_dXw * b_beta

    # Ainv = (I + L)^-1  =>  dL = -Ainv^T dAi Ainv^T, kept on the strictly lower part
    m_lower = (o_t[:, None] > o_t[None, :]) & m_t[:, None]
    b_dL = -tl.dot(tl.dot(tl.trans(b_Ai), b_dAi.to(DOT_DTYPE), input_precision=DOT_PREC).to(DOT_DTYPE),
                   tl.trans(b_Ai), input_precision=DOT_PREC)
    b_decay = tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], float("-inf")))
    b_gram = tl.dot(b_kk_dot, tl.trans(b_kk_dot), input_precision=DOT_PREC) * b_decay
    b_dL = tl.where(m_lower, b_dL, 0.)
    b_dL_L = b_dL * b_gram * b_beta[:, None]
    b_dbeta += tl.sum(b_dL * b_gram, 1)
    b_dgc += tl.sum(b_dL_L, 1) - tl.sum(b_dL_L, 0)
    b_Q = (b_dL * b_decay * b_beta[:, None]).to(DOT_DTYPE)
    b_dkk += tl.dot(b_Q, b_kk_dot, input_precision=DOT_PREC) + tl.dot(tl.trans(b_Q), b_kk_dot, input_precision=DOT_PREC)

    # kk = k rk, vv = v rk with rk = (|k|^2 + eps)^-1/2, drk/dk = -rk^3 k; written with kk = k rk:
    # dk = rk dkk - rk^2 kk (<kk, dkk> / rk + <v, dvv>)
    b_drk = tl.sum(b_kk * b_dkk, 1) * b_rk + ((b_v_dvv * b_rk * b_rk) if KACZMARZ else 0.)
    b_dk = b_dkk * b_rk[:, None] - b_kk * b_drk[:, None]
    p_dk = tl.make_block_ptr(dk + (bos * H + i_h) * K, (seq_len, K), (H * K, 1), (t0, 0), (BT, BK), (1, 0))
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))
    tl.store(deta + p_scalar, b_dbeta, mask=m_t)
    # gc is the chunk-local cumulative sum of g: dg_t = sum over i >= t of dgc_i
    b_dg = tl.sum(b_dgc, 0) - tl.cumsum(b_dgc, 0) + b_dgc
    tl.store(dg + p_scalar, b_dg, mask=m_t)
