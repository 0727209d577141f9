"""The two row kernels of vocab_parallel_cross_entropy: statistics (forward) and softmax - onehot (backward,
written in place)."""

import torch
import triton
import triton.language as tl

from ..common import triton_compat  # noqa: F401  (interpreter fix, see there)

BLOCK = 4096


@triton.jit
def row_statistics_kernel(x, labels, row_max, row_sum, label_logit, V, stride, BV: tl.constexpr):
    """Online max and sum of exp(x - max) over one row, and the label's logit (0 when another rank holds it)."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels + row)
    m = tl.full([BV], float("-inf"), tl.float32)
    s = tl.zeros([BV], dtype=tl.float32)
    picked = tl.zeros([BV], dtype=tl.float32)
    for start in range(0, V, BV):
        cols = start + tl.arange(0, BV)
        v = tl.load(x + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, v)
        # lanes still at -inf (nothing seen yet) keep a zero sum instead of exp(-inf - -inf) = nan
        s = tl.where(m_new == float("-inf"), 0., s * tl.exp(m - m_new) + tl.exp(v - m_new))
        m = m_new
        picked += tl.where((cols == label) & (cols < V), v, 0.)
    top = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0., s * tl.exp(m - top)), 0)
    tl.store(row_max + row, top)
    tl.store(row_sum + row, total)
    tl.store(label_logit + row, tl.sum(picked, 0))


@triton.jit
def softmax_minus_onehot_kernel(x, labels, row_max, log_sum, grad_loss, V, stride, BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels + row)
    m = tl.load(row_max + row)
    log_s = tl.load(log_sum + row)
    g = tl.load(grad_loss + row)
    for start in range(0, V, BV):
        cols = start + tl.arange(0, BV)
        v = tl.load(x + row * stride + cols, mask=cols < V, other=0.).to(tl.float32)
        p = tl.exp((v - m) - log_s) - tl.where(cols == label, 1., 0.)
        tl.store(x + row * stride + cols, (p * g).to(x.dtype.element_ty), mask=cols < V)


def _block(V):
    return min(BLOCK, triton.next_power_of_2(V))


def row_statistics(x, local_labels):
    rows, V = x.shape
    stats = torch.empty(3, rows, dtype=torch.float32, device=x.device)
    row_statistics_kernel[(rows,)](x, local_labels, stats[0], stats[1], stats[2], V, x.stride(0), BV=_block(V),
                                   num_warps=8)
    return stats[0], stats[1], stats[2]


def softmax_minus_onehot_(x, local_labels, row_max, log_sum, grad_loss):
    """Overwrites x [rows, V] with (softmax(x) - onehot(label)) * grad_loss and returns it."""
    rows, V = x.shape
    softmax_minus_onehot_kernel[(rows,)](x, local_labels, row_max, log_sum, grad_loss.contiguous(), V, x.stride(0),
                                         BV=_block(V), num_warps=8)
    return x
