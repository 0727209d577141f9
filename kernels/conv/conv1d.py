"""causal_conv1d: depthwise causal convolution over time with an optional SiLU (public entry point and dispatch)."""

import torch

from ..common import inputs as common
from .conv1d_torch import causal_conv1d_torch

ACTIVATIONS = ("silu", None)
MIN_WIDTH, MAX_WIDTH = 2, 8
MAX_PARTS = 3  # parts of output_split
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def causal_conv1d(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None, activation="silu",
                  output_split=None, grad_x_into=None, backend="auto"):
    """y[t] = act(sum_j weight[:, j] * x[t - W + 1 + j]) per channel, act = SiLU or identity (activation=None).

    x [B, T, C] in bf16/fp16/fp32, any strides with unit channel stride (a view of a wider projection is
    read in place); weight [C, W], 2 <= W <= 8. The W - 1 inputs before each sequence's first token come
    from initial_state [N, C, W - 1] (x's dtype or fp32; zeros when None), N = B, or the number of
    documents when cu_seqlens (int [N + 1], B = 1) packs them along T: a tap never reaches across a
    document start. final_state [N, C, W - 1] (output_final_state) holds each sequence's last W - 1
    inputs, taken from initial_state where a sequence is shorter, in initial_state's dtype (x's without
    one): it is the initial_state of the sequence's continuation (a decode step, the next rank).
    output_split: widths of up to three consecutive channel groups (summing to C) to return y as, a tuple of
    [B, T, width] tensors, each contiguous on the Triton backend: the mixer's q, k and v, which its recurrence
    then reads, and whose gradients it returns, with no copy and no concatenation.
    grad_x_into: a function the Triton backward calls for the [B, T, C] tensor (x's dtype, unit channel stride, any
    other strides) to write x's gradient into and return: the mixer's gradient of its whole projection, so that no
    copy assembles it. The torch backend's autograd ignores it.
    backend: "torch" (PyTorch, autograd), "triton" (fused kernels; CPU tensors under TRITON_INTERPRET=1),
    "auto" (triton on CUDA tensors, torch otherwise).
    Returns (y [B, T, C] contiguous in x's dtype (or its parts), final_state or None). Differentiable in x, weight
    and initial_state (also through final_state) on both backends; the weight's gradient is summed in fp32.
    """
    N = check_inputs(x, weight, initial_state, cu_seqlens, activation, output_split, backend)
    args = (x, weight, initial_state, output_final_state, cu_seqlens, activation)
    if common.use_triton(backend, x):
        from .conv1d_triton import causal_conv1d_triton
        return causal_conv1d_triton(*args, output_split, grad_x_into)
    y, final_state = causal_conv1d_torch(*args, num_sequences=N)
    return (y if output_split is None else y.split(list(output_split), dim=-1)), final_state


def check_inputs(x, weight, initial_state, cu_seqlens, activation, output_split, backend):
    """Raise ValueError with a plain message when the arguments do not fit together; returns N."""
    common.check_backend(backend)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or x.dtype not in DTYPES:
        raise ValueError(f"x must be [B, T, C] in fp32/bf16/fp16; got {tuple(x.shape)} {x.dtype}")
    B, T, C = x.shape
    if output_split is not None and not (1 <= len(output_split) <= MAX_PARTS and sum(output_split) == C
                                         and all(isinstance(w, int) and w > 0 for w in output_split)):
        raise ValueError(f"output_split must be 1 to {MAX_PARTS} positive widths summing to the {C} channels of x; "
                         f"got {output_split}")
    if T == 0:
        raise ValueError("x must hold at least one token (T >= 1)")
    if weight.dim() != 2 or weight.shape[0] != C or not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor [C, W] with C = {C} channels of x; got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    W = weight.shape[1]
    if not MIN_WIDTH <= W <= MAX_WIDTH:
        raise ValueError(f"the kernel width W = weight.shape[1] must be in {MIN_WIDTH}..{MAX_WIDTH}, got {W}")
    N = common.check_cu_seqlens(cu_seqlens, B)
    if initial_state is not None:
        if initial_state.shape != (N, C, W - 1) or initial_state.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"initial_state must be [N, C, W - 1] = {(N, C, W - 1)} in x's dtype ({x.dtype}) or fp32; "
                             f"got {tuple(initial_state.shape)} {initial_state.dtype}")
    devices = {t.device for t in (x, weight, initial_state, cu_seqlens) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, weight, initial_state and cu_seqlens must be on one device; "
                         f"got {sorted(map(str, devices))}")
    return N
