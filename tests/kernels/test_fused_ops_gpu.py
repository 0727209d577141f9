"""The fused RMSNorm and cross-entropy kernels on a real GPU, at the 0.4B model's shapes, against float64
references computed on the same GPU. Run on the device machine: pytest -m gpu tests/kernels."""

import pytest
import torch
import torch.nn.functional as F

from kernels import rms_norm, vocab_parallel_cross_entropy
from kla_testing import rel_err
from test_norm import reference as norm_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_at_model_shapes(dtype, tol, gated):
    """Layer norm over [s, b, 1536]; the KLA output norm over 12 heads of 192 with z read from the transposed
    projection, the result written time-major and z's gradient written into a slice of another time-major buffer
    (the projection's gradient), as the mixer calls it."""
    B, T = 4, 4096
    features, group = (12 * 192, 192) if gated else (1536, 1536)
    buffer = torch.randn(T, B, 2 * features, device="cuda").to(dtype)
    x = buffer[..., :features].transpose(0, 1) if gated else torch.randn(B, T, features, device="cuda").to(dtype)
    gate = buffer[..., features:].transpose(0, 1) if gated else None
    x.requires_grad_(True)
    if gated:
        gate.requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(features, device="cuda")).requires_grad_(True)
    gradient = torch.full((T, B, features + 16), float("nan"), device="cuda", dtype=dtype)
    destination = gradient[..., 8:8 + features].transpose(0, 1)
    y = rms_norm(x, weight, 1e-6, gate=gate, group_size=group, transpose_output=gated,
                 grad_gate_into=(lambda: destination) if gated else None)
    y = y.transpose(0, 1) if gated else y
    ref = norm_reference(x, weight, 1e-6, gate, group)
    cot = torch.randn(B, T, features, device="cuda", dtype=torch.float64)
    inputs = [x, weight] + ([gate] if gated else [])
    got = torch.autograd.grad((y.double() * cot).sum(), inputs)
    want = torch.autograd.grad((ref * cot).sum(), inputs)
    errors = {"y": rel_err(y, ref), **{n: rel_err(a, b) for n, a, b in zip(["dx", "dw", "dz"], got, want)}}
    print(f"rms_norm {dtype} gated={gated}: " + " ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert all(e < tol for e in errors.values()), errors
    if gated:
        assert (got[2].data_ptr(), got[2].stride()) == (destination.data_ptr(), destination.stride())
        assert gradient[..., :8].isnan().all() and gradient[..., 8 + features:].isnan().all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_cross_entropy_at_model_shapes(dtype, tol):
    rows, vocab = 16384, 32768  # a micro-batch of 4 x 4096 tokens, the padded 32000 vocabulary
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    x = logits.detach().double().requires_grad_(True)
    ref = F.cross_entropy(x, labels, reduction="none")
    cot = torch.rand(rows, device="cuda")
    (ref_grad,) = torch.autograd.grad((ref * cot.double()).sum(), x)
    loss = vocab_parallel_cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad((loss * cot).sum(), logits)
    errors = {"loss": rel_err(loss, ref), "dlogits": rel_err(grad, ref_grad)}
    print(f"cross-entropy {dtype}: " + " ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert errors["loss"] < 1e-6 and errors["dlogits"] < tol, errors
