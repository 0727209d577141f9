"""causal_conv1d on the Triton kernels (conv1d_kernels.py): the autograd Function and the launches.

Forward:  fwd (y) [-> final_state].
Backward: bwd (dx, dw partials per program) [-> bwd_state (dh0, dw partials of the state taps)] -> sum of dw.
"""

import torch
import triton

from .conv1d_kernels import (causal_conv1d_bwd_kernel, causal_conv1d_bwd_state_kernel, causal_conv1d_final_state_kernel,
                             causal_conv1d_fwd_kernel)

# Launch options: tile rows BT, channel block BC, warps; the backward runs TILES consecutive tiles per program
# (fewer dw partials to sum, and a tile's first rows were the previous tile's last). bench/conv.py --sweep
# times the alternatives.
LAUNCH = {
    "fwd": dict(BT=64, BC=128, num_warps=4),
    "bwd": dict(BT=64, BC=128, TILES=4, num_warps=8),
}
SEQUENCE_BC = 128  # channel block of the per-sequence kernels (final state, state gradient): a few rows each


def tile_options(stage, T, C, min_rows):
    """LAUNCH[stage] with tiles no larger than the input needs (decode steps compile their own small tiles)."""
    options = dict(LAUNCH[stage])
    options["BT"] = min(options["BT"], max(2, triton.next_power_of_2(min_rows)))
    options["BC"] = min(options["BC"], triton.next_power_of_2(C))
    return options


def documents(x, cu_seqlens):
    """(seq_idx, cu_seqlens) as int32 on the device: the document of every token, computed there (no host sync)."""
    if cu_seqlens is None:
        return None, None
    cu_seqlens = cu_seqlens.to(torch.int32)
    tokens = torch.arange(x.shape[1], device=x.device, dtype=torch.int32)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True, out_int32=True), cu_seqlens


def state_rows(W):
    return max(2, triton.next_power_of_2(W - 1))


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, initial_state, output_final_state, cu_seqlens, activation):
        B, T, C = x.shape
        W = weight.shape[1]
        weight = weight.contiguous()
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        seq_idx, cu = documents(x, cu_seqlens)
        N = B if cu is None else cu.numel() - 1
        flags = dict(W=W, HAS_STATE=initial_state is not None, VARLEN=cu is not None)
        y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        options = tile_options("fwd", T, C, T)
        grid = (triton.cdiv(T, options["BT"]), triton.cdiv(C, options["BC"]), B)
        causal_conv1d_fwd_kernel[grid](x, weight, initial_state, y, seq_idx, cu, T, C, x.stride(0), x.stride(1),
                                       ACTIVATION=activation, **flags, **options)
        final_state = None
        if output_final_state:
            final_state = torch.empty(N, C, W - 1, dtype=x.dtype if initial_state is None else initial_state.dtype,
                                      device=x.device)
            causal_conv1d_final_state_kernel[(N, triton.cdiv(C, SEQUENCE_BC))](
                x, initial_state, final_state, cu, T, C, x.stride(0), x.stride(1), BS=state_rows(W), BC=SEQUENCE_BC,
                **flags)
        ctx.save_for_backward(x, weight, initial_state, seq_idx, cu)
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dht):
        x, weight, initial_state, seq_idx, cu = ctx.saved_tensors
        B, T, C = x.shape
        W = weight.shape[1]
        N = B if cu is None else cu.numel() - 1
        dy = torch.zeros(B, T, C, dtype=x.dtype, device=x.device) if dy is None else dy
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        if dht is not None:
            dht = dht.contiguous()
        flags = dict(W=W, ACTIVATION=ctx.activation, HAS_FINAL_GRAD=dht is not None, VARLEN=cu is not None)
        options = tile_options("bwd", T, C, T + W - 1)
        owned = options["BT"] - (W - 1)  # rows a tile writes; tiles overlap by W - 1 (conv1d_kernels.py)
        options["TILES"] = min(options["TILES"], triton.cdiv(T, owned))
        programs = triton.cdiv(triton.cdiv(T, owned), options["TILES"])
        dx = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        dw_partial = torch.empty(B * programs + (N if initial_state is not None else 0), W, C, dtype=torch.float32,
                                 device=x.device)
        grid = (programs, triton.cdiv(C, options["BC"]), B)
        causal_conv1d_bwd_kernel[grid](x, weight, initial_state, dy, dht, dx, dw_partial, seq_idx, cu, T, C,
                                       x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                                       BW=triton.next_power_of_2(W), HAS_STATE=initial_state is not None, **flags,
                                       **options)
        dh0 = None
        if initial_state is not None:
            dh0 = torch.empty_like(initial_state)
            causal_conv1d_bwd_state_kernel[(N, triton.cdiv(C, SEQUENCE_BC))](
                x, weight, initial_state, dy, dht, dh0, dw_partial, cu, T, C, x.stride(0), x.stride(1), dy.stride(0),
                dy.stride(1), B * programs, BS=state_rows(W), BC=SEQUENCE_BC, **flags)
        dw = dw_partial.sum(0).t().to(weight.dtype).contiguous()
        return dx, dw, dh0, None, None, None


def causal_conv1d_triton(x, weight, initial_state, output_final_state, cu_seqlens, activation):
    if x.stride(-1) != 1:  # the kernels read rows of unit-stride channels; any other strides in place
        x = x.contiguous()
    return CausalConv1dFunction.apply(x, weight, initial_state, output_final_state, cu_seqlens, activation)
