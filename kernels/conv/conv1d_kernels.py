"""Triton kernels of causal_conv1d.

A program takes a tile of BT tokens x BC channels of one batch row. The input at position t + shift
(shift <= 0) "as seen by row t" is x there, or, before the first token of row t's document, that
document's initial state (zero without one); rows find their document through seq_idx (packed
documents) or are their batch row's. So tiles may cross document starts and nothing is read on the host.

    forward:  z[t] = sum_j w_j in(t - W + 1 + j);  y = act(z)          (W shifted loads; the shifted ones
                                                                         hit the cache)
    backward: dz = dy act'(z), with z recomputed; dx[t] = sum_k w_{W-1-k} dz[t + k] (same document),
              dw_{W-1-k} += x[t] dz[t + k]
Each output's dz is computed once: a backward tile computes dz on its BT rows and moves it k rows up
in registers (tl.gather), so it owns (writes dx for) its first BT - W + 1 rows and tiles overlap by
W - 1 rows. The taps that read an initial state (a document's first W - 1 outputs) give dh0 and the rest
of dw in a small kernel per document.
"""

import triton
import triton.language as tl


@triton.jit
def row_documents(seq_idx, cu_seqlens, b, t, T, VARLEN: tl.constexpr):
    """Per row t: its sequence (the batch row b, or its packed document), the sequence's first token and end."""
    if VARLEN:
        doc = tl.load(seq_idx + t, mask=t < T, other=0)
        bos = tl.load(cu_seqlens + doc)
        end = tl.load(cu_seqlens + doc + 1)
    else:
        doc = tl.zeros_like(t) + b
        bos = tl.zeros_like(t)
        end = tl.zeros_like(t) + T
    return doc, bos, end


@triton.jit
def input_at(x_row, h0, t, rel, doc, o_c, m_t, m_c, stride_t, C, shift: tl.constexpr, W: tl.constexpr,
             HAS_STATE: tl.constexpr):
    """[BT, BC] fp32: the input at t + shift (shift <= 0) for each row t whose position within its sequence
    is rel: x, or the sequence's initial state [N, C, W - 1] before its first token."""
    inside = rel + shift >= 0
    p_x = x_row + (t + shift).to(tl.int64)[:, None] * stride_t + o_c[None, :]
    value = tl.load(p_x, mask=(m_t & inside)[:, None] & m_c[None, :], other=0.).to(tl.float32)
    if HAS_STATE:
        p_h = h0 + (doc.to(tl.int64) * C)[:, None] * (W - 1) + o_c[None, :] * (W - 1) + (W - 1 + rel + shift)[:, None]
        value += tl.load(p_h, mask=(m_t & ~inside)[:, None] & m_c[None, :], other=0.).to(tl.float32)
    return value


@triton.jit
def preactivation(x_row, h0, weight, t, rel, doc, o_c, m_t, m_c, stride_t, C, W: tl.constexpr, BT: tl.constexpr,
                  BC: tl.constexpr, HAS_STATE: tl.constexpr):
    """z[t] = sum_j w_j in(t - W + 1 + j), [BT, BC] fp32."""
    z = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        w_j = tl.load(weight + o_c * W + j, mask=m_c, other=0.).to(tl.float32)
        z += w_j[None, :] * input_at(x_row, h0, t, rel, doc, o_c, m_t, m_c, stride_t, C, j - (W - 1), W, HAS_STATE)
    return z


@triton.jit
def activation_grad(z, dy, ACTIVATION: tl.constexpr):
    """dy act'(z); silu'(z) = s (1 + z (1 - s)) with s = sigmoid(z)."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(z)
        dz = dy * s * (1 + z * (1 - s))
    else:
        dz = dy
    return dz


@triton.jit
def causal_conv1d_fwd_kernel(x, weight, h0, y, seq_idx, cu_seqlens, T, C, stride_b, stride_t, W: tl.constexpr,
                             BT: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_STATE: tl.constexpr,
                             VARLEN: tl.constexpr):
    i_t, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = t < T, o_c < C
    doc, bos, _ = row_documents(seq_idx, cu_seqlens, b, t, T, VARLEN)
    x_row = x + b.to(tl.int64) * stride_b
    z = preactivation(x_row, h0, weight, t, t - bos, doc, o_c, m_t, m_c, stride_t, C, W, BT, BC, HAS_STATE)
    if ACTIVATION == "silu":
        z = z * tl.sigmoid(z)
    p_y = y + (b.to(tl.int64) * T + t)[:, None] * C + o_c[None, :]
    tl.store(p_y, z.to(y.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def sequence_span(cu_seqlens, n, T, VARLEN: tl.constexpr):
    """Batch row, first token and end of sequence n."""
    if VARLEN:
        b = n * 0
        bos = tl.load(cu_seqlens + n)
        end = tl.load(cu_seqlens + n + 1)
    else:
        b = n
        bos = n * 0
        end = n * 0 + T
    return b, bos, end


@triton.jit
def causal_conv1d_final_state_kernel(x, h0, ht, cu_seqlens, T, C, stride_b, stride_t, W: tl.constexpr,
                                     BS: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr,
                                     VARLEN: tl.constexpr):
    """ht[n, :, s] = the input at position L - W + 1 + s of sequence n (L its length; s < W - 1)."""
    n, i_c = tl.program_id(0), tl.program_id(1)
    b, bos, end = sequence_span(cu_seqlens, n, T, VARLEN)
    s = tl.arange(0, BS)
    o_c = i_c * BC + tl.arange(0, BC)
    m_s, m_c = s < W - 1, o_c < C
    t = end - (W - 1) + s
    value = input_at(x + b.to(tl.int64) * stride_b, h0, t, t - bos, tl.zeros_like(s) + n, o_c, m_s, m_c, stride_t, C,
                     0, W, HAS_STATE)
    p_ht = ht + n.to(tl.int64) * C * (W - 1) + o_c[None, :] * (W - 1) + s[:, None]
    tl.store(p_ht, value.to(ht.dtype.element_ty), mask=m_s[:, None] & m_c[None, :])


@triton.jit
def causal_conv1d_bwd_kernel(x, weight, h0, dy, dht, dx, dw_partial, seq_idx, cu_seqlens, T, C, stride_b, stride_t,
                             dy_stride_b, dy_stride_t, W: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr,
                             BC: tl.constexpr, TILES: tl.constexpr, ACTIVATION: tl.constexpr,
                             HAS_STATE: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr, VARLEN: tl.constexpr):
    """dx of TILES consecutive tiles (each owning its first BT - W + 1 rows), and this program's part of dw
    from the inputs it owns, dw_partial[program, j, c]."""
    i_p, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    OWNED: tl.constexpr = BT - (W - 1)
    r = tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_w = tl.arange(0, BW)
    x_row = x + b.to(tl.int64) * stride_b
    dy_row = dy + b.to(tl.int64) * dy_stride_b
    dw = tl.zeros([BW, BC], dtype=tl.float32)
    for i in range(TILES):
        t = (i_p * TILES + i) * OWNED + r
        m_t = t < T
        owned = m_t & (r < OWNED)
        doc, bos, end = row_documents(seq_idx, cu_seqlens, b, t, T, VARLEN)
        rel = t - bos
        z = preactivation(x_row, h0, weight, t, rel, doc, o_c, m_t, m_c, stride_t, C, W, BT, BC, HAS_STATE)
        p_dy = dy_row + t.to(tl.int64)[:, None] * dy_stride_t + o_c[None, :]
        dz = activation_grad(z, tl.load(p_dy, mask=m_t[:, None] & m_c[None, :], other=0.).to(tl.float32), ACTIVATION)
        x_t = tl.where(owned[:, None], input_at(x_row, h0, t, rel, doc, o_c, m_t, m_c, stride_t, C, 0, W, False), 0.)
        b_dx = tl.zeros([BT, BC], dtype=tl.float32)
        for k in tl.static_range(W):
            # dz[t + k]: dz moved k rows up; zero where t + k lies in another document (or past T)
            if k == 0:
                dz_k = dz
            else:
                dz_k = tl.gather(dz, tl.broadcast_to(tl.minimum(r + k, BT - 1)[:, None], (BT, BC)), 0)
                dz_k = tl.where((t + k < end)[:, None], dz_k, 0.)
            w_k = tl.load(weight + o_c * W + (W - 1 - k), mask=m_c, other=0.).to(tl.float32)
            b_dx += w_k[None, :] * dz_k
            dw += tl.where(o_w[:, None] == W - 1 - k, tl.sum(x_t * dz_k, 0)[None, :], 0.)
        if HAS_FINAL_GRAD:  # final_state slot s is the input at end - W + 1 + s
            slot = t - end + (W - 1)
            p_dht = dht + (doc.to(tl.int64) * C)[:, None] * (W - 1) + o_c[None, :] * (W - 1) + slot[:, None]
            b_dx += tl.load(p_dht, mask=(owned & (slot >= 0))[:, None] & m_c[None, :], other=0.).to(tl.float32)
        p_dx = dx + (b.to(tl.int64) * T + t)[:, None] * C + o_c[None, :]
        tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=owned[:, None] & m_c[None, :])
    program = b * tl.num_programs(0) + i_p
    p_dw = dw_partial + (program.to(tl.int64) * W + o_w[:, None]) * C + o_c[None, :]
    tl.store(p_dw, dw, mask=(o_w < W)[:, None] & m_c[None, :])


@triton.jit
def causal_conv1d_bwd_state_kernel(x, weight, h0, dy, dht, dh0, dw_partial, cu_seqlens, T, C, stride_b, stride_t,
                                   dy_stride_b, dy_stride_t, first_partial, W: tl.constexpr, BS: tl.constexpr,
                                   BC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr,
                                   VARLEN: tl.constexpr):
    """Per sequence n: dh0[n] and the part of dw from taps that read the initial state, both from the
    sequence's first W - 1 outputs (dz recomputed); dw goes to dw_partial[first_partial + n]."""
    n, i_c = tl.program_id(0), tl.program_id(1)
    b, bos, end = sequence_span(cu_seqlens, n, T, VARLEN)
    rel = tl.arange(0, BS)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    t = bos + rel
    m_t = (rel < W - 1) & (t < end)
    doc = tl.zeros_like(rel) + n
    x_row = x + b.to(tl.int64) * stride_b
    z = preactivation(x_row, h0, weight, t, rel, doc, o_c, m_t, m_c, stride_t, C, W, BS, BC, True)
    p_dy = dy + b.to(tl.int64) * dy_stride_b + t.to(tl.int64)[:, None] * dy_stride_t + o_c[None, :]
    dz = activation_grad(z, tl.load(p_dy, mask=m_t[:, None] & m_c[None, :], other=0.).to(tl.float32), ACTIVATION)
    state = h0 + n.to(tl.int64) * C * (W - 1) + o_c[None, :] * (W - 1)
    d_state = dh0 + n.to(tl.int64) * C * (W - 1) + o_c * (W - 1)
    for s in tl.static_range(W - 1):
        # slot s (the input at bos - W + 1 + s) is tap s - rel of output rel, for rel <= s
        w_tap = tl.load(weight + o_c[None, :] * W + (s - rel)[:, None], mask=(m_t & (rel <= s))[:, None] & m_c[None, :],
                        other=0.).to(tl.float32)
        grad = tl.sum(w_tap * dz, 0)
        if HAS_FINAL_GRAD:  # a sequence shorter than W - 1 passes slot s on as final-state slot s - L
            slot = s - (end - bos)
            grad += tl.load(dht + n.to(tl.int64) * C * (W - 1) + o_c * (W - 1) + slot, mask=m_c & (slot >= 0),
                            other=0.).to(tl.float32)
        tl.store(d_state + s, grad.to(dh0.dtype.element_ty), mask=m_c)
    p_dw = dw_partial + (first_partial + n).to(tl.int64) * W * C + o_c
    for j in tl.static_range(W):
        # tap j of output rel reads slot rel + j while that is < W - 1
        h = tl.load(state + (rel + j)[:, None], mask=(m_t & (rel + j < W - 1))[:, None] & m_c[None, :],
                    other=0.).to(tl.float32)
        tl.store(p_dw + j * C, tl.sum(h * dz, 0), mask=m_c)
