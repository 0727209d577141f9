"""rms_norm on Triton: forward and backward kernels and their autograd Function.

Rows are (b, t, group); a program walks row blocks of one group (grid axis 1 = group) and keeps its part of the
weight gradient in registers, so the backward writes one [programs, F] fp32 partial that a small sum reduces.
Every tensor is addressed through its (b, t) strides, so transposed views are read and written in place.
"""

import torch
import triton
import triton.language as tl

from ..common import triton_compat  # noqa: F401  (interpreter fix, see there)
from ..common.inputs import gradient_destination

ROW_BLOCK_ELEMENTS = 4096  # rows x padded group width per tile: [BR, BD] fp32 tiles stay in registers


@triton.jit
def _rows(i_blk, BR: tl.constexpr, T, rows):
    """The (b, t) of the tile's rows and their mask."""
    r = i_blk * BR + tl.arange(0, BR)
    return r // T, r % T, r < rows


@triton.jit
def rms_norm_fwd_kernel(x, w, z, y, rstd, T, rows, sxb, sxt, szb, szt, syb, syt, eps,
                        D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, HAS_GATE: tl.constexpr):
    i_p, i_g = tl.program_id(0), tl.program_id(1)
    num_p = tl.num_programs(0)
    G = tl.num_programs(1)
    cols = tl.arange(0, BD)
    cmask = cols < D
    weight = tl.load(w + i_g * D + cols, mask=cmask, other=0.).to(tl.float32)
    for i_blk in range(i_p, tl.cdiv(rows, BR), num_p):
        b, t, rmask = _rows(i_blk, BR, T, rows)
        mask = rmask[:, None] & cmask[None, :]
        col = i_g * D + cols[None, :]
        xv = tl.load(x + (b * sxb + t * sxt)[:, None] + col, mask=mask, other=0.).to(tl.float32)
        r = 1. / tl.sqrt(tl.sum(xv * xv, 1) / D + eps)
        out = xv * r[:, None] * weight[None, :]
        if HAS_GATE:
            zv = tl.load(z + (b * szb + t * szt)[:, None] + col, mask=mask, other=0.).to(tl.float32)
            out = out * zv * tl.sigmoid(zv)
        tl.store(y + (b * syb + t * syt)[:, None] + col, out.to(y.dtype.element_ty), mask=mask)
        tl.store(rstd + (b * T + t) * G + i_g, r, mask=rmask)


@triton.jit
def rms_norm_bwd_kernel(x, w, z, dy, rstd, dx, dz, dw_partial, T, rows, sxb, sxt, szb, szt, sdyb, sdyt, sdzb, sdzt,
                        D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, HAS_GATE: tl.constexpr):
    i_p, i_g = tl.program_id(0), tl.program_id(1)
    num_p = tl.num_programs(0)
    G = tl.num_programs(1)
    cols = tl.arange(0, BD)
    cmask = cols < D
    weight = tl.load(w + i_g * D + cols, mask=cmask, other=0.).to(tl.float32)
    dweight = tl.zeros([BD], dtype=tl.float32)
    for i_blk in range(i_p, tl.cdiv(rows, BR), num_p):
        b, t, rmask = _rows(i_blk, BR, T, rows)
        mask = rmask[:, None] & cmask[None, :]
        col = i_g * D + cols[None, :]
        xv = tl.load(x + (b * sxb + t * sxt)[:, None] + col, mask=mask, other=0.).to(tl.float32)
        g = tl.load(dy + (b * sdyb + t * sdyt)[:, None] + col, mask=mask, other=0.).to(tl.float32)
        r = tl.load(rstd + (b * T + t) * G + i_g, mask=rmask, other=0.)
        n = xv * r[:, None]
        if HAS_GATE:
            zv = tl.load(z + (b * szb + t * szt)[:, None] + col, mask=mask, other=0.).to(tl.float32)
            sig = tl.sigmoid(zv)
            # d silu(z) / dz = sig (1 + z (1 - sig))
            tl.store(dz + (b * sdzb + t * sdzt)[:, None] + col,
                     (g * n * weight[None, :] * sig * (1. + zv * (1. - sig))).to(dz.dtype.element_ty), mask=mask)
            g = g * zv * sig
        dweight += tl.sum(g * n, 0)
        dn = g * weight[None, :]
        dxv = r[:, None] * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])
        tl.store(dx + (b * T + t)[:, None] * (G * D) + col, dxv.to(dx.dtype.element_ty), mask=mask)
    tl.store(dw_partial + i_p * G * D + i_g * D + cols, dweight, mask=cmask)


def _launch(x, group_size):
    """(BD, BR, grid rows-programs, options) for x [B, T, F] in groups of group_size."""
    B, T, features = x.shape
    BD = triton.next_power_of_2(group_size)
    BR = max(1, min(64, ROW_BLOCK_ELEMENTS // BD))
    blocks = triton.cdiv(B * T, BR)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    groups = features // group_size
    programs = max(1, min(blocks, 8 * sms // groups))
    return BD, BR, programs, dict(num_warps=8 if BD >= 2048 else 4)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gate, eps, group_size, transpose_output, grad_gate_into):
        B, T, features = x.shape
        groups = features // group_size
        y = torch.empty(T, B, features, dtype=x.dtype, device=x.device)
        y_bt = y.transpose(0, 1)
        if not transpose_output:
            y_bt = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = torch.empty(B * T * groups, dtype=torch.float32, device=x.device)
        BD, BR, programs, options = _launch(x, group_size)
        z = gate if gate is not None else x
        rms_norm_fwd_kernel[(programs, groups)](
            x, weight, z, y_bt, rstd, T, B * T, x.stride(0), x.stride(1), z.stride(0), z.stride(1),
            y_bt.stride(0), y_bt.stride(1), eps, D=group_size, BD=BD, BR=BR, HAS_GATE=gate is not None, **options)
        ctx.save_for_backward(x, weight, gate, rstd)
        ctx.group_size = group_size
        ctx.transpose_output, ctx.grad_gate_into = transpose_output, grad_gate_into
        return y if transpose_output else y_bt

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate, rstd = ctx.saved_tensors
        B, T, features = x.shape
        group_size = ctx.group_size
        groups = features // group_size
        dy_bt = dy.transpose(0, 1) if ctx.transpose_output else dy
        if dy_bt.stride(-1) != 1:
            dy_bt = dy_bt.contiguous()
        dx = torch.empty(B, T, features, dtype=x.dtype, device=x.device)
        dz = gradient_destination(ctx.grad_gate_into, gate) if gate is not None else None
        BD, BR, programs, options = _launch(x, group_size)
        dw_partial = torch.empty(programs, features, dtype=torch.float32, device=x.device)
        z = gate if gate is not None else x
        rms_norm_bwd_kernel[(programs, groups)](
            x, weight, z, dy_bt, rstd, dx, dz if dz is not None else dx, dw_partial, T, B * T,
            x.stride(0), x.stride(1), z.stride(0), z.stride(1), dy_bt.stride(0), dy_bt.stride(1),
            *(dz.stride()[:2] if dz is not None else (0, 0)), D=group_size, BD=BD, BR=BR, HAS_GATE=gate is not None,
            **options)
        return dx, dw_partial.sum(0).to(weight.dtype), dz, None, None, None, None
