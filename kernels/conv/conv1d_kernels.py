"""Triton kernels of causal_conv1d.

A program takes BC channels of one batch row over L consecutive tokens and walks them one token at a
time, keeping the last W inputs (and in the backward the last W output gradients) in registers, as
tuples of [BC] vectors: every input is read from memory once, every output written once, and each
token's pre-activation and SiLU derivative computed once. Loads run AHEAD tokens in front of the
walk, so that many are in flight.

    forward (t up):    z[t] = sum_j w_j in(t - W + 1 + j);  y[t] = act(z[t])
    backward (t down): dz[t] = dy[t] act'(z[t]) (z recomputed);  dx[t] = sum_k w_{W-1-k} dz[t + k];
                       dw_j += dz[t] in(t - W + 1 + j)
in(s) is x, or before the first token of t's sequence that sequence's initial state (zero without one).
Sequences are the batch rows, or the packed documents of cu_seqlens (found per token through seq_idx,
so a walk may cross document starts and nothing is read on the host). The window is read afresh
(W loads) near a sequence start, and in the backward the gradient window is cleared at a sequence end.
A backward program also walks the W - 1 tokens after its own (their dz reaches its dx) and writes its
part of dw; the sums over programs are one small reduction. The initial state's gradient comes from a
kernel per sequence over its first W - 1 outputs. The output (and its gradient) may be held as up to three
contiguous tensors of consecutive channel groups (the mixer's q, k, v); a channel block lies in one of them.
"""

import triton
import triton.language as tl


@triton.jit
def sequence_of(seq_idx, cu_seqlens, b, t, T, VARLEN: tl.constexpr):
    """(sequence, first token, end) of token t: batch row b, or t's packed document."""
    if VARLEN:
        n = tl.load(seq_idx + t)
        bos = tl.load(cu_seqlens + n)
        end = tl.load(cu_seqlens + n + 1)
    else:
        n = b
        bos = b * 0
        end = b * 0 + T
    return n, bos, end


@triton.jit
def sequence_span(cu_seqlens, n, T, VARLEN: tl.constexpr):
    """(batch row, first token, end) of sequence n."""
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
def part_block(i_c, p0, p1, p2, S0, S1, C, BC: tl.constexpr):
    """Channel block i_c of an output (or output gradient) held as up to three parts, the consecutive channel
    groups of widths S0, S1 and C - S0 - S1, each its own contiguous [B, T, width] tensor p0, p1, p2; a block
    never straddles two parts. Returns (the block's channels o_c of x and the weight, their mask, the part,
    its width, the block's columns o_p in it)."""
    n0 = tl.cdiv(S0, BC)
    n1 = tl.cdiv(S1, BC)
    zero = i_c * 0  # the same scalar type in every branch
    if i_c < n0:
        part, start, width, block = p0, zero, zero + S0, i_c
    elif i_c < n0 + n1:
        part, start, width, block = p1, zero + S0, zero + S1, i_c - n0
    else:
        part, start, width, block = p2, zero + S0 + S1, zero + C - S0 - S1, i_c - n0 - n1
    o_p = block * BC + tl.arange(0, BC)
    return start + o_p, o_p < width, part, width, o_p


@triton.jit
def input_row(x_row, h0, t, rel, n, o_c, m_c, stride_t, C, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """[BC] fp32: the input at token t, at offset rel (>= 1 - W) from the start of sequence n: x there, or
    before the start the sequence's initial state [N, C, W - 1] (zero without one)."""
    value = tl.load(x_row + tl.cast(t, tl.int64) * stride_t + o_c, mask=m_c & (rel >= 0), other=0.).to(tl.float32)
    if HAS_STATE:
        p_h = h0 + n.to(tl.int64) * C * (W - 1) + o_c * (W - 1) + (W - 1 + rel)
        value += tl.load(p_h, mask=m_c & (rel < 0), other=0.).to(tl.float32)
    return value


@triton.jit
def inputs_up_to(x_row, h0, t, rel, n, o_c, m_c, stride_t, C, COUNT: tl.constexpr, W: tl.constexpr,
                 HAS_STATE: tl.constexpr):
    """The COUNT inputs at tokens t - COUNT + 1 .. t of sequence n, oldest first (t at offset rel)."""
    window = ()
    for i in tl.static_range(COUNT):
        window = window + (input_row(x_row, h0, t + i - COUNT + 1, rel + i - COUNT + 1, n, o_c, m_c, stride_t, C,
                                     W, HAS_STATE),)
    return window


@triton.jit
def conv_weights(weight, o_c, m_c, W: tl.constexpr):
    """(w_0, .., w_{W-1}), each [BC] fp32, of a [C, W] weight."""
    taps = ()
    for j in tl.static_range(W):
        taps = taps + (tl.load(weight + o_c * W + j, mask=m_c, other=0.).to(tl.float32),)
    return taps


@triton.jit
def rows_ahead(p, t, stride_t, step: tl.constexpr, lo, hi, o_c, m_c, AHEAD: tl.constexpr):
    """Loads of the AHEAD rows t, t + step, .. of [T, C] rows at p that lie in [lo, hi), as stored (zero outside)."""
    rows = ()
    for i in tl.static_range(AHEAD):
        s = t + i * step
        rows = rows + (tl.load(p + tl.cast(s, tl.int64) * stride_t + o_c, mask=m_c & (s >= lo) & (s < hi), other=0.),)
    return rows


@triton.jit
def silu_grad(z, dy):
    """dy silu'(z) = dy s (1 + z (1 - s)), s = sigmoid(z)."""
    s = tl.sigmoid(z)
    return dy * s * (1 + z * (1 - s))


@triton.jit
def causal_conv1d_fwd_kernel(x, weight, h0, y0, y1, y2, S0, S1, seq_idx, cu_seqlens, T, C, stride_b, stride_t,
                             W: tl.constexpr, L: tl.constexpr, BC: tl.constexpr, AHEAD: tl.constexpr,
                             UNROLL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_STATE: tl.constexpr,
                             VARLEN: tl.constexpr):
    i_t, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c, m_c, y, width, o_p = part_block(i_c, y0, y1, y2, S0, S1, C, BC)
    x_row = x + b.to(tl.int64) * stride_b
    p_y = y + b.to(tl.int64) * T * width + o_p
    w = conv_weights(weight, o_c, m_c, W)
    first = i_t * L
    last = tl.minimum(first + L, T)
    n, bos, end = sequence_of(seq_idx, cu_seqlens, b, first, T, VARLEN)
    ahead = rows_ahead(x_row, first, stride_t, 1, first, last, o_c, m_c, AHEAD)
    window = inputs_up_to(x_row, h0, first - 1, first - 1 - bos, n, o_c, m_c, stride_t, C, W - 1, W, HAS_STATE)
    for t in tl.range(first, last, loop_unroll_factor=UNROLL):
        if VARLEN:
            if t >= end:
                n, bos, end = sequence_of(seq_idx, cu_seqlens, b, t, T, VARLEN)
        rel = t - bos
        if rel < W - 1:  # the window reaches before the sequence's start (or into the previous one)
            window = inputs_up_to(x_row, h0, t - 1, rel - 1, n, o_c, m_c, stride_t, C, W - 1, W, HAS_STATE)
        x_t = ahead[0].to(tl.float32)
        ahead = ahead[1:] + rows_ahead(x_row, t + AHEAD, stride_t, 1, first, last, o_c, m_c, 1)
        z = w[W - 1] * x_t
        for j in tl.static_range(W - 1):
            z += w[j] * window[j]
        if ACTIVATION == "silu":
            z = z * tl.sigmoid(z)
        tl.store(p_y + tl.cast(t, tl.int64) * width, z.to(y.dtype.element_ty), mask=m_c)
        window = window[1:] + (x_t,)


@triton.jit
def causal_conv1d_final_state_kernel(x, h0, ht, cu_seqlens, T, C, stride_b, stride_t, W: tl.constexpr,
                                     BC: tl.constexpr, HAS_STATE: tl.constexpr, VARLEN: tl.constexpr):
    """ht[n, :, s] = the input at offset L - W + 1 + s of sequence n (L its length; s < W - 1)."""
    n, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b, bos, end = sequence_span(cu_seqlens, n, T, VARLEN)
    last = inputs_up_to(x + b.to(tl.int64) * stride_b, h0, end - 1, end - 1 - bos, n, o_c, m_c, stride_t, C, W - 1,
                        W, HAS_STATE)
    p_ht = ht + n.to(tl.int64) * C * (W - 1) + o_c * (W - 1)
    for s in tl.static_range(W - 1):
        tl.store(p_ht + s, last[s].to(ht.dtype.element_ty), mask=m_c)


@triton.jit
def causal_conv1d_bwd_kernel(x, weight, h0, dy0, dy1, dy2, S0, S1, dht, dx, dw_partial, seq_idx, cu_seqlens, T, C,
                             stride_b, stride_t, stride_dx_b, stride_dx_t, W: tl.constexpr, L: tl.constexpr,
                             BC: tl.constexpr, AHEAD: tl.constexpr, UNROLL: tl.constexpr, ACTIVATION: tl.constexpr,
                             HAS_STATE: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr, VARLEN: tl.constexpr):
    """dx of tokens [first, first + L), and this program's part of dw, dw_partial[program, j, c]."""
    i_t, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_c, m_c, dy, width, o_p = part_block(i_c, dy0, dy1, dy2, S0, S1, C, BC)
    x_row = x + b.to(tl.int64) * stride_b
    dy_row = dy + b.to(tl.int64) * T * width
    p_dx = dx + b.to(tl.int64) * stride_dx_b + o_c
    w = conv_weights(weight, o_c, m_c, W)
    first = i_t * L
    owned_end = tl.minimum(first + L, T)
    top = tl.minimum(first + L + W - 1, T) - 1  # the walk starts W - 1 tokens past the owned ones
    n, bos, end = sequence_of(seq_idx, cu_seqlens, b, top, T, VARLEN)
    lowest = tl.maximum(first - (W - 1), 0)  # the lowest input the walk reads
    edges = rows_ahead(x_row, top - (W - 1), stride_t, -1, lowest, top + 1, o_c, m_c, AHEAD)
    grads = rows_ahead(dy_row, top, width, -1, first, top + 1, o_p, m_c, AHEAD)
    window = inputs_up_to(x_row, h0, top, top - bos, n, o_c, m_c, stride_t, C, W, W, HAS_STATE)
    later = ()  # dz[t + 1], .., dz[t + W - 1]
    dw = ()
    for j in tl.static_range(W - 1):
        later = later + (tl.zeros([BC], dtype=tl.float32),)
    for j in tl.static_range(W):
        dw = dw + (tl.zeros([BC], dtype=tl.float32),)
    previous_rel = top * 0  # the first token reads its window afresh
    for t in tl.range(top, first - 1, -1, loop_unroll_factor=UNROLL):
        if VARLEN:
            if t < bos:  # t is the last token of an earlier document: later tokens' dz do not reach it
                n, bos, end = sequence_of(seq_idx, cu_seqlens, b, t, T, VARLEN)
                for k in tl.static_range(W - 1):
                    later = later[:k] + (tl.zeros([BC], dtype=tl.float32),) + later[k + 1:]
        rel = t - bos
        edge = edges[0].to(tl.float32)  # the input at t - W + 1
        edges = edges[1:] + rows_ahead(x_row, t - (W - 1) - AHEAD, stride_t, -1, lowest, top + 1, o_c, m_c, 1)
        if (rel < W - 1) | (previous_rel < W - 1):  # the window reaches before the sequence's start, or did
            window = inputs_up_to(x_row, h0, t, rel, n, o_c, m_c, stride_t, C, W, W, HAS_STATE)
        else:
            window = (edge,) + window[:W - 1]
        g = grads[0].to(tl.float32)
        grads = grads[1:] + rows_ahead(dy_row, t - AHEAD, width, -1, first, top + 1, o_p, m_c, 1)
        z = w[0] * window[0]
        for j in tl.static_range(1, W):
            z += w[j] * window[j]
        dz = silu_grad(z, g) if ACTIVATION == "silu" else g
        grad_x = w[W - 1] * dz
        for k in tl.static_range(1, W):
            grad_x += w[W - 1 - k] * later[k - 1]
        if HAS_FINAL_GRAD:  # final-state slot s is the input at end - W + 1 + s
            slot = t - end + (W - 1)
            if slot >= 0:
                grad_x += tl.load(dht + n.to(tl.int64) * C * (W - 1) + o_c * (W - 1) + slot, mask=m_c,
                                  other=0.).to(tl.float32)
        if t < owned_end:
            tl.store(p_dx + tl.cast(t, tl.int64) * stride_dx_t, grad_x.to(dx.dtype.element_ty), mask=m_c)
            for j in tl.static_range(W):
                dw = dw[:j] + (dw[j] + dz * window[j],) + dw[j + 1:]
        later = (dz,) + later[:W - 2]
        previous_rel = rel
    p_dw = dw_partial + ((b * tl.num_programs(0) + i_t).to(tl.int64) * W) * C + o_c
    for j in tl.static_range(W):
        tl.store(p_dw + j * C, dw[j], mask=m_c)


@triton.jit
def causal_conv1d_bwd_state_kernel(x, weight, h0, dy0, dy1, dy2, S0, S1, dht, dh0, cu_seqlens, T, C, stride_b,
                                   stride_t, W: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr,
                                   HAS_FINAL_GRAD: tl.constexpr, VARLEN: tl.constexpr):
    """dh0[n] from sequence n's first W - 1 outputs (dz recomputed): initial-state slot s (the input at offset
    s - W + 1) is tap s - r of the output at offset r, for r <= s."""
    n, i_c = tl.program_id(0), tl.program_id(1)
    o_c, m_c, dy, width, o_p = part_block(i_c, dy0, dy1, dy2, S0, S1, C, BC)
    b, bos, end = sequence_span(cu_seqlens, n, T, VARLEN)
    x_row = x + b.to(tl.int64) * stride_b
    w = conv_weights(weight, o_c, m_c, W)
    grad = ()
    for s in tl.static_range(W - 1):
        grad = grad + (tl.zeros([BC], dtype=tl.float32),)
    for r in tl.static_range(W - 1):
        t = bos + r
        if t < end:
            window = inputs_up_to(x_row, h0, t, t - bos, n, o_c, m_c, stride_t, C, W, W, True)
            z = w[0] * window[0]
            for j in tl.static_range(1, W):
                z += w[j] * window[j]
            p_dy = dy + (b.to(tl.int64) * T + t) * width + o_p
            g = tl.load(p_dy, mask=m_c, other=0.).to(tl.float32)
            dz = silu_grad(z, g) if ACTIVATION == "silu" else g
            for s in tl.static_range(r, W - 1):
                grad = grad[:s] + (grad[s] + w[s - r] * dz,) + grad[s + 1:]
    p_dh0 = dh0 + n.to(tl.int64) * C * (W - 1) + o_c * (W - 1)
    for s in tl.static_range(W - 1):
        value = grad[s]
        if HAS_FINAL_GRAD:  # a sequence shorter than W - 1 passes slot s on as final-state slot s - length
            slot = s - (end - bos)
            value += tl.load(dht + n.to(tl.int64) * C * (W - 1) + o_c * (W - 1) + slot, mask=m_c & (slot >= 0),
                             other=0.).to(tl.float32)
        tl.store(p_dh0 + s, value.to(dh0.dtype.element_ty), mask=m_c)
