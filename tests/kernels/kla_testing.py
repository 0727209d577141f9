"""Inputs and error measures shared by the kernel tests."""

import torch
import torch.nn.functional as F

from kernels import chunk_kla, naive_recurrent_kla

FP32_TOL = 1e-4  # relative error for fp32 inputs (issue 4: well under 1e-3); bf16 inputs: 1e-2


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64; NaN anywhere counts as infinitely wrong."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, K, V, *, dtype=torch.float32, device="cpu", key_scale=1.0, seed=0, states=None,
                requires_grad=False):
    """Random q, k, v, g, eta (+ an initial state for `states` sequences). Key norms are log-normal
    around key_scale; gates span fast and slow decay."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    q = rand(B, T, H, K)
    k = rand(B, T, H, K) / K ** 0.5 * key_scale * rand(B, T, H, 1).mul(0.5).exp()
    v = rand(B, T, H, V)
    g = F.logsigmoid(rand(B, T, H) * 2 + 3) * rand(B, T, H).abs().mul(2).exp()
    eta = torch.sigmoid(rand(B, T, H) * 2)
    tensors = [q.to(dtype), k.to(dtype), v.to(dtype), g, eta]
    if states is not None:
        tensors.append(rand(states, H, K, V) * 0.5)
    tensors = [x.to(device) for x in tensors]
    if requires_grad:
        for x in tensors:
            x.requires_grad_(True)
    return tensors


def grads(outputs, inputs, seed=1):
    """Gradients of a random projection of `outputs` (each paired with its own random cotangent)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    loss = sum((out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)).sum()
               for out in outputs)
    return torch.autograd.grad(loss, inputs)


def check_against_reference(backend, B, T, H, K, V, *, dtype=torch.float32, tol=FP32_TOL, cu_seqlens=None,
                            key_scale=1.0, beta_mode="kaczmarz", normalize_q=True, with_states=True, seed=0,
                            device="cpu", change_inputs=None):
    """chunk_kla's outputs, final state and all six gradients against the float64 reference.
    change_inputs(q, k, v, g, eta) -> the same, to draw adversarial inputs."""
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    inputs = make_inputs(B, T, H, K, V, dtype=dtype, key_scale=key_scale, seed=seed, device=device,
                         states=N if with_states else None)
    if change_inputs is not None:
        inputs[:5] = change_inputs(*inputs[:5])
    for x in inputs:
        x.requires_grad_(True)
    q, k, v, g, eta = inputs[:5]
    h0 = inputs[5] if with_states else None
    options = dict(initial_state=h0, output_final_state=True, cu_seqlens=offsets, beta_mode=beta_mode,
                   normalize_q=normalize_q)
    o_ref, ht_ref = naive_recurrent_kla(q, k, v, g, eta, **options)
    o, ht = chunk_kla(q, k, v, g, eta, backend=backend, **options)
    assert o.dtype == v.dtype and o.shape == v.shape and ht.dtype == torch.float32
    errors = {"o": rel_err(o, o_ref), "final_state": rel_err(ht, ht_ref)}
    for name, d, d_ref in zip("q k v g eta h0".split(), grads([o, ht], inputs), grads([o_ref, ht_ref], inputs)):
        errors["d" + name] = rel_err(d, d_ref)
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errors})"
    return errors
