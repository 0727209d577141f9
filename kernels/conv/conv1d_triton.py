"""causal_conv1d on the Triton kernels (conv1d_kernels.py): the autograd Function and the launches.

Forward:  fwd (y, or its parts) [-> final_state].
Backward: bwd (dx, a part of dw per program) [-> bwd_state (dh0)] -> sum of the parts of dw.
"""

import torch
import triton

from ..common import triton_compat  # noqa: F401  (interpreter fix, see there)
from ..common.inputs import gradient_destination
from .conv1d_kernels import (causal_conv1d_bwd_kernel, causal_conv1d_bwd_state_kernel, causal_conv1d_final_state_kernel,
                             causal_conv1d_fwd_kernel)

# Launch options: tokens per program L, channel block BC, rows loaded ahead of the walk AHEAD, loop unrolling (it
# removes the register moves of the sliding windows), warps. BC is for W <= 4; wider kernels hold more window
# registers and get a proportionally narrower block (launch_options). bench/conv.py --sweep times the alternatives.
LAUNCH = {
    "fwd": dict(L=128, BC=256, AHEAD=4, UNROLL=4, num_warps=1),
    "bwd": dict(L=128, BC=128, AHEAD=4, UNROLL=4, num_warps=1),
}
SEQUENCE_BC = 128  # channel block of the per-sequence kernels (final state, initial-state gradient)


def launch_options(stage, W):
    options = dict(LAUNCH[stage])
    options["BC"] = max(16, options["BC"] * 4 // max(4, triton.next_power_of_2(W)))
    return options


def documents(x, cu_seqlens):
    """(seq_idx, cu_seqlens) as int32 on the device: the document of every token, computed there (no host sync)."""
    if cu_seqlens is None:
        return None, None
    cu_seqlens = cu_seqlens.to(torch.int32)
    tokens = torch.arange(x.shape[1], device=x.device, dtype=torch.int32)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True, out_int32=True), cu_seqlens


def part_arguments(tensors, widths):
    """What the kernels take of an output held as parts: three part pointers (a missing part repeats the first; it
    is never read) and the widths S0, S1 of the first two (0 for a missing part)."""
    pointers = list(tensors) + [tensors[0]] * (3 - len(tensors))
    S0, S1 = (list(widths) + [0, 0])[:2]
    return (*pointers, S0, S1)


def channel_blocks(widths, BC):
    """Programs along the channels: each part's channels in blocks of BC (a block never straddles two parts)."""
    return sum(triton.cdiv(width, BC) for width in widths)


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, initial_state, output_final_state, cu_seqlens, activation, widths, grad_x_into):
        B, T, C = x.shape
        W = weight.shape[1]
        weight = weight.contiguous()
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        seq_idx, cu = documents(x, cu_seqlens)
        N = B if cu is None else cu.numel() - 1
        flags = dict(W=W, HAS_STATE=initial_state is not None, VARLEN=cu is not None)
        ys = [torch.empty(B, T, width, dtype=x.dtype, device=x.device) for width in widths]
        options = launch_options("fwd", W)
        programs = (triton.cdiv(T, options["L"]), channel_blocks(widths, options["BC"]), B)
        causal_conv1d_fwd_kernel[programs](x, weight, initial_state, *part_arguments(ys, widths), seq_idx, cu, T, C,
                                           x.stride(0), x.stride(1), ACTIVATION=activation, **flags, **options)
        final_state = None
        if output_final_state:
            final_state = torch.empty(N, C, W - 1, dtype=x.dtype if initial_state is None else initial_state.dtype,
                                      device=x.device)
            causal_conv1d_final_state_kernel[(N, triton.cdiv(C, SEQUENCE_BC))](
                x, initial_state, final_state, cu, T, C, x.stride(0), x.stride(1), BC=SEQUENCE_BC, **flags)
        ctx.save_for_backward(x, weight, initial_state, seq_idx, cu)
        ctx.activation, ctx.widths, ctx.grad_x_into = activation, widths, grad_x_into
        ctx.set_materialize_grads(False)
        return (*ys, final_state)

    @staticmethod
    def backward(ctx, *grads):
        x, weight, initial_state, seq_idx, cu = ctx.saved_tensors
        *dys, dht = grads
        B, T, C = x.shape
        W = weight.shape[1]
        N = B if cu is None else cu.numel() - 1
        widths = ctx.widths
        dys = [torch.zeros(B, T, width, dtype=x.dtype, device=x.device) if dy is None else dy.contiguous()
               for dy, width in zip(dys, widths)]
        if dht is not None:
            dht = dht.contiguous()
        flags = dict(W=W, ACTIVATION=ctx.activation, HAS_FINAL_GRAD=dht is not None, VARLEN=cu is not None)
        dx = gradient_destination(ctx.grad_x_into, x)
        options = launch_options("bwd", W)
        programs = (triton.cdiv(T, options["L"]), channel_blocks(widths, options["BC"]), B)
        dw_partial = torch.empty(B * programs[0], W, C, dtype=torch.float32, device=x.device)
        causal_conv1d_bwd_kernel[programs](x, weight, initial_state, *part_arguments(dys, widths), dht, dx, dw_partial,
                                           seq_idx, cu, T, C, x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
                                           HAS_STATE=initial_state is not None, **flags, **options)
        dh0 = None
        if initial_state is not None:
            dh0 = torch.empty_like(initial_state)
            causal_conv1d_bwd_state_kernel[(N, channel_blocks(widths, SEQUENCE_BC))](
                x, weight, initial_state, *part_arguments(dys, widths), dht, dh0, cu, T, C, x.stride(0), x.stride(1),
                BC=SEQUENCE_BC, **flags)
        dw = dw_partial.sum(0).t().to(weight.dtype).contiguous()
        return dx, dw, dh0, None, None, None, None, None


def causal_conv1d_triton(x, weight, initial_state, output_final_state, cu_seqlens, activation, output_split,
                         grad_x_into):
    if x.stride(-1) != 1:  # the kernels read rows of unit-stride channels; any other strides in place
        x = x.contiguous()
    widths = (x.shape[-1],) if output_split is None else tuple(output_split)
    *ys, final_state = CausalConv1dFunction.apply(x, weight, initial_state, output_final_state, cu_seqlens, activation,
                                                  widths, grad_x_into)
    return (ys[0] if output_split is None else tuple(ys)), final_state
