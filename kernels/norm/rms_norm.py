"""rms_norm: RMSNorm over groups of features, optionally gated by SiLU, in one pass (public entry and torch path).

    y = x / sqrt(mean_D(x^2) + eps) * weight * (silu(gate) if gate is given)

over each group of `group_size` consecutive features (one group: a layer's RMSNorm; a group per head: the KLA
output norm, gated by z). Computed in fp32, rounded once to x's dtype.
"""

import torch
import torch.nn.functional as F

from ..common.inputs import check_backend, use_triton


def rms_norm(x, weight, eps=1e-6, *, gate=None, group_size=None, transpose_output=False, grad_gate_into=None,
             backend="auto"):
    """x [B, T, F] (any strides with unit feature stride; e.g. a transposed view), weight [F] (or any shape of F
    elements), gate [B, T, F] or None (same rules as x). group_size divides F (default F).
    transpose_output: return the result as a contiguous [T, B, F] tensor (megatron's layout), else [B, T, F].
    grad_gate_into: a function the Triton backward calls for the tensor to write the gate's gradient into and return
    (gate's shape and dtype, unit feature stride, any other strides); the torch backend's autograd ignores it.
    Differentiable in x, weight and gate; backend "torch", "triton" or "auto" (Triton on CUDA)."""
    check_backend(backend)
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm takes x [B, T, F] with unit feature stride; got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    features = x.shape[-1]
    group_size = features if group_size is None else group_size
    if features % group_size:
        raise ValueError(f"group_size {group_size} must divide the feature count {features}")
    if weight.numel() != features:
        raise ValueError(f"weight must have {features} elements, got shape {tuple(weight.shape)}")
    if gate is not None and (gate.shape != x.shape or gate.stride(-1) != 1):
        raise ValueError(f"gate must be [B, T, F] = {tuple(x.shape)} with unit feature stride; got {tuple(gate.shape)}")
    if use_triton(backend, x):
        from .rms_norm_triton import RMSNormFunction

        return RMSNormFunction.apply(x, weight.reshape(-1), gate, eps, group_size, transpose_output, grad_gate_into)
    return rms_norm_torch(x, weight, eps, gate, group_size, transpose_output)


def rms_norm_torch(x, weight, eps, gate, group_size, transpose_output):
    B, T, features = x.shape
    x32 = x.float().reshape(B, T, features // group_size, group_size)
    y = (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).reshape(B, T, features)
    y = y * weight.reshape(-1).float()
    if gate is not None:
        y = y * F.silu(gate.float())
    y = y.to(x.dtype)
    return y.transpose(0, 1).contiguous() if transpose_output else y
