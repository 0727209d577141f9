"""Inputs and the reference comparison shared by the causal_conv1d tests (CPU and GPU)."""

import torch

from kernels import causal_conv1d, naive_causal_conv1d
from kla_testing import grads, rel_err

FP32_TOL = 1e-5  # relative error, fp32 inputs (outputs, final state, every gradient)
BF16_TOL = 5e-3  # bf16/fp16 inputs: y, dx, dh0 are rounded once (the GPU rounds: about 2e-3; the CPU interpreter
#                  truncates fp32 -> bf16, which doubles that: up to 4.2e-3 in test_conv.py)


def projection_view(B, T, C, *, dtype=torch.float32, device="cpu", seed=0, extra=7):
    """x [B, T, C] as the mixer passes it: a strided view proj.transpose(0, 1)[..., :C] of a [T, B, C + extra]
    projection (strides (C + extra, B * (C + extra), 1)). Returns (proj, x); proj is the leaf."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(T, B, C + extra, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    return proj, proj.transpose(0, 1)[..., :C]


def conv_parameters(C, W, N, *, dtype=torch.float32, state_dtype=None, device="cpu", seed=1, with_state=True):
    """weight [C, W] (fp32 like the model's parameter unless dtype says otherwise) and initial_state [N, C, W - 1]."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(C, W, generator=gen) / W ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    h0 = None
    if with_state:
        h0 = torch.randn(N, C, W - 1, generator=gen).to(device=device, dtype=state_dtype or dtype).requires_grad_(True)
    return weight, h0


def check_against_reference(backend, B, T, C, W, *, dtype=torch.float32, tol=FP32_TOL, cu_seqlens=None,
                            with_state=True, activation="silu", output_split=None, gradient_in_place=False,
                            device="cpu", seed=0):
    """y, final_state and the gradients of the projection (through the strided view), weight and initial_state
    against the float64 reference. With output_split, y comes as its parts (contiguous on the Triton backend),
    each differentiated on its own. gradient_in_place (Triton): x's gradient is written into a slice of another
    wider time-major buffer (grad_x_into, as the mixer has it written into its projection's gradient); the gradient
    must be that slice, and the rest of the buffer untouched. Returns the relative errors."""
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    proj, x = projection_view(B, T, C, dtype=dtype, device=device, seed=seed)
    weight, h0 = conv_parameters(C, W, N, dtype=torch.float32, state_dtype=dtype, device=device, seed=seed + 1,
                                 with_state=with_state)
    options = dict(initial_state=h0, output_final_state=True, cu_seqlens=offsets, activation=activation)
    buffer = torch.full((T, B, C + 10), float("nan"), dtype=dtype, device=device)
    destination = buffer.transpose(0, 1)[..., 3:3 + C]
    y, final = causal_conv1d(x, weight, backend=backend, output_split=output_split,
                             grad_x_into=(lambda: destination) if gradient_in_place else None, **options)
    y_ref, final_ref = naive_causal_conv1d(x, weight, **options)
    parts = [y] if output_split is None else list(y)
    parts_ref = y_ref.split(output_split or [C], dim=-1)
    assert [p.shape for p in parts] == [p.shape for p in parts_ref] and all(p.dtype == x.dtype for p in parts)
    if backend == "triton" or output_split is None:  # the torch backend's parts are views of one output
        assert all(p.is_contiguous() for p in parts)
    assert final.shape == (N, C, W - 1) and final.dtype == (x.dtype if h0 is None else h0.dtype)
    errors = {"y": rel_err(torch.cat(parts, -1), y_ref), "final_state": rel_err(final, final_ref)}
    inputs = [x if gradient_in_place else proj, weight] + ([h0] if with_state else [])
    got = grads([*parts, final], inputs)
    for name, leaf, d, d_ref in zip(["dx", "dweight", "dh0"], inputs, got, grads([*parts_ref, final_ref], inputs)):
        assert d.dtype == leaf.dtype and d.shape == leaf.shape
        errors[name] = rel_err(d, d_ref)
    if gradient_in_place:
        assert (got[0].data_ptr(), got[0].stride()) == (destination.data_ptr(), destination.stride())
        assert buffer[..., :3].isnan().all() and buffer[..., 3 + C:].isnan().all()
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errors})"
    return errors
