"""The sequential stages of chunk_kla: the state recurrence over chunks and its reverse.

One program per (column block, document, head) walks the document's chunks in order, keeping the
[K, BV] block of the fp32 state in registers. With d = rk exp(gl - gc) per token (kk = k rk):
    forward:  store h; vn = u - w h; h = exp(gl) h + k^T (d vn)
    backward: store dh (grad of the state after the chunk); dvn = dv_local + d (k dh);
              dh = exp(gl) dh + q^T (rq scale exp(gc) do) - w^T dvn
(Computing the outputs or dv_local inside these walks was measured slower: the walk is latency-bound,
and the extra products lengthen every step.)
Keys and queries enter the products as stored; the per-token factors scale the [BT, BV] side.

Both walks are affine in the state they start from. For context parallelism a launch can walk, beside
the value columns, the K x K transition of some documents: the same recurrence without values (u, do and
dv_local read as zero) from the identity. Its per-chunk states P and new values vp then turn the walk
from zero into the walk from any incoming state x: h = h_zero + P x, vn = vn_zero + vp x (and the same
for dh, dvn from a final-state gradient), which `chunk_kla_apply_state_kernel` adds afterwards, in
place of a second walk. Those columns are extra programs of the same launch, so where the walk leaves
the GPU idle (long sequences, few heads) they cost little time.
"""

import triton
import triton.language as tl

from .sequences import BT, chunk_position, load_rows, load_tokens, row_block


@triton.jit
def document_walk(cu_seqlens, chunk_offsets, i_nh, H):
    """The program's document i_n and head i_h, where the document lies and the index of its first chunk."""
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    seq_len = tl.load(cu_seqlens + i_n + 1) - bos
    first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    return i_n, i_h, bos.to(tl.int64), seq_len, first_chunk


@triton.jit
def state_block(K: tl.constexpr, W: tl.constexpr, col, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the [BK, BV] block, columns col.., of a row-major K x W state."""
    o_col = col + tl.arange(0, BV)
    return tl.arange(0, BK)[:, None] * W + o_col[None, :], (tl.arange(0, BK) < K)[:, None] & (o_col < W)[None, :]


@triton.jit
def identity_block(K: tl.constexpr, col, BK: tl.constexpr, BV: tl.constexpr):
    """Columns col.. of the K x K identity, where a transition walk starts."""
    o_col = col + tl.arange(0, BV)
    return ((tl.arange(0, BK)[:, None] == o_col[None, :]) & (o_col < K)[None, :]).to(tl.float32)


@triton.jit
def transition_bases(p, vp, cu_seqlens, chunk_offsets, first_seq, H, K: tl.constexpr):
    """p [chunks, H, K, K] and vp [tokens, H, K] hold the documents from first_seq on: their bases shifted so
    that global chunk and token indices land in them."""
    first_token = tl.load(cu_seqlens + first_seq).to(tl.int64)
    first_chunk = tl.load(chunk_offsets + first_seq).to(tl.int64)
    return p - first_chunk * H * K * K, vp - first_token * H * K


@triton.jit
def chunk_decays(gc, rk, bos, t0, seq_len, i_h, H):
    """gc of the chunk's rows, gl (its value at the chunk's last token), and d = rk exp(gl - gc)."""
    o_t = t0 + tl.arange(0, BT)
    b_gc = load_tokens(gc, bos, o_t, seq_len, i_h, H)
    b_gl = tl.load(gc + (bos + tl.minimum(t0 + BT, seq_len) - 1) * H + i_h, mask=t0 < seq_len, other=0.)
    return b_gc, b_gl, load_tokens(rk, bos, o_t, seq_len, i_h, H) * tl.exp(b_gl - b_gc)


@triton.jit
def forward_walk(b_h, k, rk, gc, w, u, states, values, bos, seq_len, first_chunk, i_h, H, K: tl.constexpr,
                 W: tl.constexpr, col, BK: tl.constexpr, BV: tl.constexpr, READ_VALUES: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Walk a document's chunks from b_h, the [BK, BV] block (columns col..) of a K x W state: store the state
    before each chunk to `states` [chunks, H, K, W] and the new values to `values` [T, H, W]; return the
    state after the last chunk. Without READ_VALUES, u is zero: the walk carries a transition."""
    p_state, m_state = state_block(K, W, col, BK, BV)
    for i_t in range(tl.cdiv(seq_len, BT)):
        t0 = i_t * BT
        tl.store(states + ((first_chunk + i_t) * H + i_h) * K * W + p_state, b_h.to(states.dtype.element_ty),
                 mask=m_state)
        b_w = load_rows(w, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        if READ_VALUES:
            b_vn = tl.load(row_block(u, bos, t0, seq_len, i_h, H, W, col, BV), boundary_check=(0, 1)).to(tl.float32)
            b_vn -= tl.dot(b_w, b_h.to(DOT_DTYPE), input_precision=DOT_PREC)
        else:
            b_vn = -tl.dot(b_w, b_h.to(DOT_DTYPE), input_precision=DOT_PREC)
        tl.store(row_block(values, bos, t0, seq_len, i_h, H, W, col, BV), b_vn.to(values.dtype.element_ty),
                 boundary_check=(0, 1))
        b_k = load_rows(k, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        b_gc, b_gl, b_d = chunk_decays(gc, rk, bos, t0, seq_len, i_h, H)
        b_h = b_h * tl.exp(b_gl) + tl.dot(tl.trans(b_k), (b_vn * b_d[:, None]).to(DOT_DTYPE), input_precision=DOT_PREC)
    return b_h


@triton.jit
def backward_walk(b_dh, q, k, rk, rq, gc, w, do, dv_local, dstates, dvalues, bos, seq_len, first_chunk, i_h, scale,
                  H, K: tl.constexpr, W: tl.constexpr, col, BK: tl.constexpr, BV: tl.constexpr,
                  READ_VALUES: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """The reverse walk from b_dh, the gradient of the state after the document: store dh after each chunk
    to `dstates` and dvn to `dvalues`; return the gradient of the state before the first chunk. Without
    READ_VALUES, do and dv_local are zero: the walk carries the transposed transition."""
    p_state, m_state = state_block(K, W, col, BK, BV)
    for i_t in range(tl.cdiv(seq_len, BT) - 1, -1, -1):
        t0 = i_t * BT
        tl.store(dstates + ((first_chunk + i_t) * H + i_h) * K * W + p_state, b_dh.to(dstates.dtype.element_ty),
                 mask=m_state)
        b_k = load_rows(k, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        b_gc, b_gl, b_d = chunk_decays(gc, rk, bos, t0, seq_len, i_h, H)
        if READ_VALUES:
            b_dvn = tl.load(row_block(dv_local, bos, t0, seq_len, i_h, H, W, col, BV), boundary_check=(0, 1))
            b_dvn = b_dvn.to(tl.float32) + tl.dot(b_k, b_dh.to(DOT_DTYPE), input_precision=DOT_PREC) * b_d[:, None]
        else:
            b_dvn = tl.dot(b_k, b_dh.to(DOT_DTYPE), input_precision=DOT_PREC) * b_d[:, None]
        tl.store(row_block(dvalues, bos, t0, seq_len, i_h, H, W, col, BV), b_dvn.to(dvalues.dtype.element_ty),
                 boundary_check=(0, 1))
        if READ_VALUES:
            b_q = load_rows(q, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
            b_do = tl.load(row_block(do, bos, t0, seq_len, i_h, H, W, col, BV), boundary_check=(0, 1))
            b_q_scale = load_tokens(rq, bos, t0 + tl.arange(0, BT), seq_len, i_h, H) * scale * tl.exp(b_gc)
        b_w = load_rows(w, bos, t0, seq_len, i_h, H, K, BK).to(DOT_DTYPE)
        if READ_VALUES:
            b_dh = (b_dh * tl.exp(b_gl)
                    + tl.dot(tl.trans(b_q), (b_do.to(tl.float32) * b_q_scale[:, None]).to(DOT_DTYPE),
                             input_precision=DOT_PREC)
                    - tl.dot(tl.trans(b_w), b_dvn.to(DOT_DTYPE), input_precision=DOT_PREC))
        else:
            b_dh = b_dh * tl.exp(b_gl) - tl.dot(tl.trans(b_w), b_dvn.to(DOT_DTYPE), input_precision=DOT_PREC)
    return b_dh


@triton.jit
def chunk_kla_fwd_h_kernel(k, rk, gc, w, u, h, vn, h0, ht, p, vp, pt, cu_seqlens, chunk_offsets, first_seq, end_seq,
                           H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                           TRANSITIONS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Column blocks 0.. cdiv(V, BV) - 1 walk the state; with TRANSITIONS, the blocks after them walk the
    transition of documents first_seq .. end_seq - 1 into p [their chunks, H, K, K], vp [their tokens, H, K]
    and pt [end_seq - first_seq, H, K, K] (the other documents' programs of those blocks return at once)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h, bos, seq_len, first_chunk = document_walk(cu_seqlens, chunk_offsets, i_nh, H)
    if TRANSITIONS:  # (a branch only here: in the plain kernel it would cost registers)
        if i_v >= tl.cdiv(V, BV):
            if (i_n >= first_seq) & (i_n < end_seq):
                col = (i_v - tl.cdiv(V, BV)) * BV
                p_chunks, vp_tokens = transition_bases(p, vp, cu_seqlens, chunk_offsets, first_seq, H, K)
                b_p = forward_walk(identity_block(K, col, BK, BV), k, rk, gc, w, u, p_chunks, vp_tokens, bos, seq_len,
                                   first_chunk, i_h, H, K, K, col, BK, BV, False, DOT_DTYPE, DOT_PREC)
                p_state, m_state = state_block(K, K, col, BK, BV)
                tl.store(pt + ((i_n - first_seq) * H + i_h).to(tl.int64) * K * K + p_state, b_p, mask=m_state)
            return
    p_state, m_state = state_block(K, V, i_v * BV, BK, BV)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + p_state, mask=m_state, other=0.)
    b_h = forward_walk(b_h, k, rk, gc, w, u, h, vn, bos, seq_len, first_chunk, i_h, H, K, V, i_v * BV, BK, BV, True,
                       DOT_DTYPE, DOT_PREC)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + p_state, b_h, mask=m_state)


@triton.jit
def chunk_kla_bwd_dh_kernel(q, k, rk, rq, gc, w, do, dv_local, dh, dvn, dht, dh0, p, vp, pt, cu_seqlens,
                            chunk_offsets, first_seq, end_seq, scale, H, K: tl.constexpr, V: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, USE_FINAL_STATE_GRAD: tl.constexpr,
                            STORE_INITIAL_STATE_GRAD: tl.constexpr, TRANSITIONS: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """The reverse of chunk_kla_fwd_h_kernel, with the same column blocks: p, vp, pt receive the transposed
    transitions (from the end of each document back to each chunk) and their dvn."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h, bos, seq_len, first_chunk = document_walk(cu_seqlens, chunk_offsets, i_nh, H)
    if TRANSITIONS:
        if i_v >= tl.cdiv(V, BV):
            if (i_n >= first_seq) & (i_n < end_seq):
                col = (i_v - tl.cdiv(V, BV)) * BV
                p_chunks, vp_tokens = transition_bases(p, vp, cu_seqlens, chunk_offsets, first_seq, H, K)
                b_p = backward_walk(identity_block(K, col, BK, BV), q, k, rk, rq, gc, w, do, dv_local, p_chunks,
                                    vp_tokens, bos, seq_len, first_chunk, i_h, scale, H, K, K, col, BK, BV, False,
                                    DOT_DTYPE, DOT_PREC)
                p_state, m_state = state_block(K, K, col, BK, BV)
                tl.store(pt + ((i_n - first_seq) * H + i_h).to(tl.int64) * K * K + p_state, b_p, mask=m_state)
            return
    p_state, m_state = state_block(K, V, i_v * BV, BK, BV)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_state, mask=m_state, other=0.)
    b_dh = backward_walk(b_dh, q, k, rk, rq, gc, w, do, dv_local, dh, dvn, bos, seq_len, first_chunk, i_h, scale, H, K,
                         V, i_v * BV, BK, BV, True, DOT_DTYPE, DOT_PREC)
    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_state, b_dh, mask=m_state)


@triton.jit
def chunk_kla_apply_state_kernel(states, values, p, vp, x, cu_seqlens, chunk_indices, chunk_offsets, first_seq,
                                 H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
                                 BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """states += p x per chunk and values += vp x per token, for the chunks of documents first_seq.. that p, vp
    (a transition walk of the kernels above) cover; x [those documents, H, K, V] fp32 is each document's
    incoming state (forward) or final-state gradient (backward). One program per (chunk x value block, head);
    the contraction over K runs in blocks of BC, in fp32 operands."""
    i_c, i_v, i_h = tl.program_id(0) // tl.cdiv(V, BV), tl.program_id(0) % tl.cdiv(V, BV), tl.program_id(1)
    i_cg = tl.load(chunk_offsets + first_seq) + i_c  # the chunk's global index
    bos, seq_len, t0, _ = chunk_position(cu_seqlens, chunk_indices, i_cg)
    i_x = (tl.load(chunk_indices + i_cg * 2) - first_seq) * H + i_h
    p_chunks, vp_tokens = transition_bases(p, vp, cu_seqlens, chunk_offsets, first_seq, H, K)
    b_dstate = tl.zeros([BK, BV], dtype=tl.float32)
    b_dvalue = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BC)):
        p_x = tl.make_block_ptr(x + i_x.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BC, i_v * BV), (BC, BV), (1, 0))
        b_x = tl.load(p_x, boundary_check=(0, 1))
        p_p = tl.make_block_ptr(p_chunks + (i_cg * H + i_h).to(tl.int64) * K * K, (K, K), (K, 1), (0, i_k * BC),
                                (BK, BC), (1, 0))
        b_p = tl.load(p_p, boundary_check=(0, 1)).to(tl.float32)
        b_vp = tl.load(row_block(vp_tokens, bos, t0, seq_len, i_h, H, K, i_k * BC, BC),
                       boundary_check=(0, 1)).to(tl.float32)
        b_dstate += tl.dot(b_p, b_x, input_precision=DOT_PREC)
        b_dvalue += tl.dot(b_vp, b_x, input_precision=DOT_PREC)
    p_state = tl.make_block_ptr(states + (i_cg * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (0, i_v * BV),
                                (BK, BV), (1, 0))
    b_state = tl.load(p_state, boundary_check=(0, 1)).to(tl.float32) + b_dstate
    tl.store(p_state, b_state.to(states.dtype.element_ty), boundary_check=(0, 1))
    p_value = row_block(values, bos, t0, seq_len, i_h, H, V, i_v * BV, BV)
    b_value = tl.load(p_value, boundary_check=(0, 1)).to(tl.float32) + b_dvalue
    tl.store(p_value, b_value.to(values.dtype.element_ty), boundary_check=(0, 1))
