"""The fused (gated) RMSNorm against its float64 definition: outputs and the gradients of x, weight and gate,
for the layouts the model uses (a layer's norm over [s, b, h]; the KLA output norm per head over a [b, t, H V]
tensor with the gate read from a transposed view and the result written time-major)."""

import pytest
import torch
import torch.nn.functional as F

from kernels import rms_norm
from kla_testing import rel_err

BACKENDS = ["torch", "triton"]


def reference(x, weight, eps, gate, group_size):
    B, T, features = x.shape
    x64 = x.double().reshape(B, T, -1, group_size)
    y = (x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps)).reshape(B, T, features) * weight.double().reshape(-1)
    return y * F.silu(gate.double()) if gate is not None else y


def check(backend, B, T, features, group_size, *, gated, strided, transpose_output, dtype=torch.float32, tol=1e-6):
    gen = torch.Generator().manual_seed(0)
    if strided:  # views into a wider time-major buffer, as the mixer reads its projection
        buffer = torch.randn(T, B, 3 * features, generator=gen).to(dtype)
        x, gate = buffer[..., :features].transpose(0, 1), buffer[..., 2 * features:].transpose(0, 1)
    else:
        x, gate = torch.randn(B, T, features, generator=gen).to(dtype), torch.randn(B, T, features, generator=gen).to(dtype)
    x = x * torch.rand(B, T, 1, generator=gen).mul(4).exp().to(dtype)  # rows of very different scale
    x.requires_grad_(True)
    gate = gate.detach().requires_grad_(True) if gated else None
    weight = (1 + 0.1 * torch.randn(features, generator=gen)).requires_grad_(True)
    y = rms_norm(x, weight, 1e-6, gate=gate, group_size=group_size, transpose_output=transpose_output, backend=backend)
    ref = reference(x, weight, 1e-6, gate, group_size)
    if transpose_output:
        assert y.shape == (T, B, features) and y.is_contiguous()
        y = y.transpose(0, 1)
    cotangent = torch.randn(B, T, features, generator=gen, dtype=torch.float64)
    inputs = [x, weight] + ([gate] if gated else [])
    got = torch.autograd.grad((y.double() * cotangent).sum(), inputs)
    want = torch.autograd.grad((ref * cotangent).sum(), inputs)
    assert rel_err(y, ref) < tol
    for name, a, b in zip(["dx", "dweight", "dgate"], got, want):
        assert rel_err(a, b) < tol, f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm(backend):
    check(backend, 3, 5, 96, 96, gated=False, strided=False, transpose_output=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_head_norm_on_views_written_time_major(backend):
    check(backend, 2, 7, 4 * 24, 24, gated=True, strided=True, transpose_output=True)


def test_group_width_not_a_power_of_two():
    check("triton", 2, 3, 3 * 40, 40, gated=True, strided=False, transpose_output=False)


def test_gate_gradient_written_into_the_callers_tensor():
    """grad_gate_into: the backward writes the gate's gradient through the given tensor's strides (a slice of a wider
    time-major buffer, as the mixer's gradient of its projection) and returns it; nothing else of the buffer changes."""
    B, T, features, group_size = 2, 7, 4 * 24, 24
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, features, generator=gen).requires_grad_(True)
    gate = torch.randn(B, T, features, generator=gen).requires_grad_(True)
    weight = 1 + 0.1 * torch.randn(features, generator=gen)
    buffer = torch.full((T, B, features + 10), float("nan"))
    destination = buffer.transpose(0, 1)[..., 4:4 + features]
    y = rms_norm(x, weight, gate=gate, group_size=group_size, grad_gate_into=lambda: destination, backend="triton")
    cotangent = torch.randn(B, T, features, generator=gen, dtype=torch.float64)
    dgate, dx = torch.autograd.grad((y.double() * cotangent).sum(), [gate, x])
    want_dgate, want_dx = torch.autograd.grad((reference(x, weight, 1e-6, gate, group_size) * cotangent).sum(), [gate, x])
    assert dgate.data_ptr() == destination.data_ptr() and dgate.stride() == destination.stride()
    assert rel_err(dgate, want_dgate) < 1e-6 and rel_err(dx, want_dx) < 1e-6
    assert buffer[..., :4].isnan().all() and buffer[..., 4 + features:].isnan().all()


def test_bad_arguments_are_named():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="group_size 3 must divide"):
        rms_norm(x, torch.ones(8), group_size=3)
    with pytest.raises(ValueError, match="weight must have 8 elements"):
        rms_norm(x, torch.ones(4))
