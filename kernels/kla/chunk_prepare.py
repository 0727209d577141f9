"""Per-chunk preparation of chunk_kla and its backward (the WY/UT stages of chunk_torch.py).

Forward, one program per (chunk, head), in two kernels: fwd_solve computes the cumulative log decay gc,
the key and query norms rk = (|k|^2+eps)^-1/2, rq, the strictly lower L = beta_i <kk_i, kk_j>
exp(gc_i - gc_j) of the unit keys kk = k rk and its inverse Ainv = (I + L)^-1 (kept for the backward);
fwd_wu computes w = Ainv (beta exp(gc) kk) and u = Ainv (beta vv) with vv = v rk (kaczmarz) or v
(sigmoid). bwd_prepare reverses these stages and the key/value normalisation in one program.

Keys, queries and values enter the tensor-core products as stored (bf16 stays bf16); the per-token
factors (rk, beta, decays) scale the other operand or the product, so no fp32 copy of a [BT, K] tile
lives across a product.
"""

import triton
import triton.language as tl

from .sequences import BT, chunk_position, load_rows, load_tokens, row_block


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
def inverse_norm(b_x, eps):
    """(|x_t|^2 + eps)^-1/2 of each row of a [BT, D] tile, in fp32."""
    b_x = b_x.to(tl.float32)
    return tl.rsqrt(tl.sum(b_x * b_x, 1) + eps)


@triton.jit
def key_gram(b_k, b_rk, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """<kk_i, kk_j> = <k_i, k_j> rk_i rk_j, fp32 [BT, BT]."""
    b_k = b_k.to(DOT_DTYPE)
    return tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PREC) * b_rk[:, None] * b_rk[None, :]


@triton.jit
def chunk_inverse_pointers(Ainv, bos, o_t, i_h, H):
    return Ainv + (bos + o_t[:, None]) * (H * BT) + i_h * BT + tl.arange(0, BT)[None, :]


@triton.jit
def chunk_kla_fwd_solve_kernel(q, k, g, eta, gc, rk, rq, Ainv, cu_seqlens, chunk_indices, eps, H, K: tl.constexpr,
                               BK: tl.constexpr, NORMALIZE_Q: tl.constexpr, DOT_DTYPE: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    """gc, rk, rq (1 without query normalisation) and Ainv of one chunk, all kept for the backward
    (as fla keeps its A)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, seq_len, t0, o_t = chunk_position(cu_seqlens, chunk_indices, i_c)
    m_t = o_t < seq_len
    p_token = (bos + o_t) * H + i_h
    b_gc = tl.cumsum(load_tokens(g, bos, o_t, seq_len, i_h, H), 0)
    b_beta = load_tokens(eta, bos, o_t, seq_len, i_h, H)
    tl.store(gc + p_token, b_gc, mask=m_t)
    if NORMALIZE_Q:
        b_rq = inverse_norm(load_rows(q, bos, t0, seq_len, i_h, H, K, BK), eps)
    else:
        b_rq = tl.full([BT], 1., dtype=tl.float32)
    tl.store(rq + p_token, b_rq, mask=m_t)
    b_k = load_rows(k, bos, t0, seq_len, i_h, H, K, BK)
    b_rk = inverse_norm(b_k, eps)
    tl.store(rk + p_token, b_rk, mask=m_t)

    # L = beta_i <kk_i, kk_j> exp(gc_i - gc_j), strictly lower
    m_lower = (o_t[:, None] > o_t[None, :]) & m_t[:, None]
    b_L = key_gram(b_k, b_rk, DOT_DTYPE, DOT_PREC)
    b_L *= b_beta[:, None] * tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], float("-inf")))
    b_Ai = invert_unit_lower(b_L, DOT_PREC)
    tl.store(chunk_inverse_pointers(Ainv, bos, o_t, i_h, H), b_Ai.to(Ainv.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def apply_to_rows(b_A, x, y, bos, t0, seq_len, i_h, H, D: tl.constexpr, BC: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """y = A x for the chunk's rows of head i_h of x, y [T, H, D], in column blocks of BC."""
    for i_d in range(tl.cdiv(D, BC)):
        b_x = tl.load(row_block(x, bos, t0, seq_len, i_h, H, D, i_d * BC, BC), boundary_check=(0, 1))
        b_y = tl.dot(b_A, b_x.to(DOT_DTYPE), input_precision=DOT_PREC)
        tl.store(row_block(y, bos, t0, seq_len, i_h, H, D, i_d * BC, BC), b_y.to(y.dtype.element_ty),
                 boundary_check=(0, 1))


@triton.jit
def chunk_kla_fwd_wu_kernel(k, v, eta, gc, rk, Ainv, w, u, cu_seqlens, chunk_indices, H, K: tl.constexpr,
                            V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KACZMARZ: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """w = Ainv diag(beta exp(gc) rk) k and u = Ainv diag(beta [rk]) v of one chunk, both in column blocks
    of BV (no [BT, K] accumulator)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, seq_len, t0, o_t = chunk_position(cu_seqlens, chunk_indices, i_c)
    b_beta = load_tokens(eta, bos, o_t, seq_len, i_h, H)
    b_rk = load_tokens(rk, bos, o_t, seq_len, i_h, H)
    b_Ai = tl.load(chunk_inverse_pointers(Ainv, bos, o_t, i_h, H), mask=(o_t < seq_len)[:, None], other=0.)
    b_Ai = b_Ai.to(tl.float32)
    b_step = b_beta * tl.exp(load_tokens(gc, bos, o_t, seq_len, i_h, H)) * b_rk
    apply_to_rows((b_Ai * b_step[None, :]).to(DOT_DTYPE), k, w, bos, t0, seq_len, i_h, H, K, BV, DOT_DTYPE, DOT_PREC)
    b_Au = (b_Ai * (b_beta * b_rk if KACZMARZ else b_beta)[None, :]).to(DOT_DTYPE)
    apply_to_rows(b_Au, v, u, bos, t0, seq_len, i_h, H, V, BV, DOT_DTYPE, DOT_PREC)


@triton.jit
def chunk_kla_bwd_prepare_kernel(k, v, eta, gc, rk, Ainv, du, dw, dkk, dgc, dk, dv, deta, dg, cu_seqlens,
                                 chunk_indices, H, K: tl.constexpr, V: tl.constexpr,
                                 BK: tl.constexpr, BV: tl.constexpr, KACZMARZ: tl.constexpr,
                                 DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """From du (= dvn), dw (= -dvn h^T, as vn = u - w h; formed in chunk_kla_bwd_dqkg, which reads h) and
    the partial dkk, dgc of chunk_kla_bwd_dqkg: dk, dv, deta, dg."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, seq_len, t0, o_t = chunk_position(cu_seqlens, chunk_indices, i_c)
    m_t = o_t < seq_len
    p_token = (bos + o_t) * H + i_h
    b_gc = load_tokens(gc, bos, o_t, seq_len, i_h, H)
    b_beta = load_tokens(eta, bos, o_t, seq_len, i_h, H)
    b_rk = load_tokens(rk, bos, o_t, seq_len, i_h, H)
    b_Ai = tl.load(chunk_inverse_pointers(Ainv, bos, o_t, i_h, H), mask=m_t[:, None], other=0.).to(DOT_DTYPE)

    # u = Ainv Xu, Xu = beta vv; vv = v rk (kaczmarz) or v. Values first: few registers live here.
    b_value_scale = b_beta * b_rk if KACZMARZ else b_beta
    b_dAi = tl.zeros([BT, BT], dtype=tl.float32)       # before the column scaling by b_value_scale
    b_v_dXu = tl.zeros([BT], dtype=tl.float32)         # <v_t, dXu_t>
    for i_v in range(tl.cdiv(V, BV)):
        b_v = tl.load(row_block(v, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1))
        b_du = tl.load(row_block(du, bos, t0, seq_len, i_h, H, V, i_v * BV, BV), boundary_check=(0, 1))
        b_du = b_du.to(DOT_DTYPE)
        b_dXu = tl.dot(tl.trans(b_Ai), b_du, input_precision=DOT_PREC)
        b_dAi += tl.dot(b_du, tl.trans(b_v.to(DOT_DTYPE)), input_precision=DOT_PREC)
        b_v_dXu += tl.sum(b_v.to(tl.float32) * b_dXu, 1)
        tl.store(row_block(dv, bos, t0, seq_len, i_h, H, V, i_v * BV, BV),
                 (b_dXu * b_value_scale[:, None]).to(dv.dtype.element_ty), boundary_check=(0, 1))
    b_dAi *= b_value_scale[None, :]
    b_dbeta = b_v_dXu * (b_rk if KACZMARZ else 1.)

    # w = Ainv Xw, Xw = beta exp(gc) kk = diag(step rk) k: first the part of dAi, so that dL is formed
    # before dXw and dkk, the two [BT, K] fp32 tiles, are live
    b_k = load_rows(k, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
    b_dw = load_rows(dw, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
    b_step = b_beta * tl.exp(b_gc)
    b_dAi += tl.dot(b_dw, tl.trans(b_k), input_precision=DOT_PREC) * (b_step * b_rk)[None, :]

    # Ainv = (I + L)^-1  =>  dL = -Ainv^T dAi Ainv^T, kept on the strictly lower part
    m_lower = (o_t[:, None] > o_t[None, :]) & m_t[:, None]
    b_dL = -tl.dot(tl.dot(tl.trans(b_Ai), b_dAi.to(DOT_DTYPE), input_precision=DOT_PREC).to(DOT_DTYPE),
                   tl.trans(b_Ai), input_precision=DOT_PREC)
    b_decay = tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], float("-inf")))
    b_gram = key_gram(b_k, b_rk, DOT_DTYPE, DOT_PREC) * b_decay
    b_dL = tl.where(m_lower, b_dL, 0.)
    b_dL_L = b_dL * b_gram * b_beta[:, None]
    b_dbeta += tl.sum(b_dL * b_gram, 1)
    b_dgc = load_tokens(dgc, bos, o_t, seq_len, i_h, H) + tl.sum(b_dL_L, 1) - tl.sum(b_dL_L, 0)
    # Q = dL decay beta: dkk gets (Q + Q^T) kk, kk = diag(rk) k
    b_Q = b_dL * b_decay * b_beta[:, None]
    b_QQ = ((b_Q + tl.trans(b_Q)) * b_rk[None, :]).to(DOT_DTYPE)

    # dXw = Ainv^T dw; dkk (fp32, partial from bwd_dqkg) += step dXw + (Q + Q^T) kk
    b_dXw = tl.dot(tl.trans(b_Ai), b_dw, input_precision=DOT_PREC)
    b_kk_dXw = tl.sum(b_k.to(tl.float32) * b_dXw, 1) * b_rk * tl.exp(b_gc)
    b_dbeta += b_kk_dXw
    b_dgc += b_kk_dXw * b_beta
    b_dkk = load_rows(dkk, bos, t0, seq_len, i_h, H, K, BK) + b_dXw * b_step[:, None]
    b_dkk += tl.dot(b_QQ, b_k, input_precision=DOT_PREC)

    # kk = k rk, vv = v rk with rk = (|k|^2 + eps)^-1/2, drk/dk = -rk^3 k:
    # dk = rk dkk - k rk drk, drk = rk^2 <k, dkk> (+ <v, dvv>)
    b_drk = tl.sum(b_k.to(tl.float32) * b_dkk, 1) * b_rk * b_rk + ((b_v_dXu * b_beta * b_rk * b_rk) if KACZMARZ else 0.)
    b_dk = (b_dkk - b_k.to(tl.float32) * b_drk[:, None]) * b_rk[:, None]
    tl.store(row_block(dk, bos, t0, seq_len, i_h, H, K, 0, BK), b_dk.to(dk.dtype.element_ty), boundary_check=(0, 1))
    tl.store(deta + p_token, b_dbeta, mask=m_t)
    # gc is the chunk-local cumulative sum of g: dg_t = sum over i >= t of dgc_i
    b_dg = tl.sum(b_dgc, 0) - tl.cumsum(b_dgc, 0) + b_dgc
    tl.store(dg + p_token, b_dg, mask=m_t)
