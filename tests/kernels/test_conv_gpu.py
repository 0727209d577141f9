"""causal_conv1d's Triton kernels on a GPU at the training shapes (the mixer's strided view of the projection),
against the float64 reference computed on the same GPU; every gradient compared.
Run on the device machine: pytest -m gpu tests/kernels/test_conv_gpu.py"""

import pytest
import torch

from conv_testing import BF16_TOL, FP32_TOL, check_against_reference, conv_parameters, projection_view
from kernels import causal_conv1d
from kernels.conv.conv1d_torch import causal_conv1d_torch
from kla_testing import grads, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)]


def report(name, errors):
    print(f"{name}: " + " ".join(f"{n} {e:.1e}" for n, e in errors.items()))


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_training_shape(dtype, tol):
    """B4 T4096 C4608 (kla-0.4b's q, k, v channels), W = 4, from a strided [T, B, C'] projection, states in and out."""
    report(f"B4 T4096 C4608 {dtype}", check_against_reference("triton", 4, 4096, 4608, 4, dtype=dtype, tol=tol,
                                                               device="cuda"))


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("split", [[1152, 1152, 2304], [576, 576, 1152]], ids=["tp1", "tp2"])
def test_output_as_the_mixers_q_k_v(dtype, tol, split):
    """y as kla-0.4b's q, k, v (and those of one rank at tensor parallelism 2), each its own contiguous tensor."""
    errors = check_against_reference("triton", 4, 4096, sum(split), 4, dtype=dtype, tol=tol, output_split=split,
                                     device="cuda")
    report(f"parts {split} {dtype}", errors)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_gradient_written_into_the_mixers_projection_gradient(dtype, tol):
    """As the mixer runs it: q, k, v as parts, and x's gradient written into a slice of a wider time-major buffer."""
    errors = check_against_reference("triton", 4, 4096, 4608, 4, dtype=dtype, tol=tol, output_split=[1152, 1152, 2304],
                                     gradient_in_place=True, device="cuda")
    report(f"gradient in place {dtype}", errors)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("with_state", [True, False])
def test_packed_documents(dtype, tol, with_state):
    cu_seqlens = [0, 1, 3, 3, 700, 701, 2050, 4096]  # documents shorter than W, an empty one
    errors = check_against_reference("triton", 1, 4096, 4608, 4, dtype=dtype, tol=tol, cu_seqlens=cu_seqlens,
                                     with_state=with_state, device="cuda")
    report(f"packed {dtype} state {with_state}", errors)


@pytest.mark.parametrize("W", [2, 3, 8])
def test_other_widths_and_ragged_channels(W):
    report(f"W {W}", check_against_reference("triton", 2, 1000, 1000, W, device="cuda"))


def test_without_activation():
    check_against_reference("triton", 2, 1000, 4608, 4, activation=None, device="cuda")


def test_long_sequence_matches_float64_torch_path():
    """B1 T65536 C4608 bf16 (the benchmark's long shape) against the torch path run in float64."""
    proj, x = projection_view(1, 65536, 4608, dtype=torch.bfloat16, device="cuda")
    weight, h0 = conv_parameters(4608, 4, 1, state_dtype=torch.bfloat16, device="cuda")
    inputs = [proj, weight, h0]
    out = causal_conv1d(x, weight, initial_state=h0, output_final_state=True, backend="triton")
    ref = causal_conv1d_torch(x.double(), weight.double(), h0.double(), True, None, "silu", num_sequences=1)
    errors = {"y": rel_err(out[0], ref[0]), "final_state": rel_err(out[1], ref[1])}
    for name, d, d_ref in zip(["dx", "dweight", "dh0"], grads(out, inputs), grads(ref, inputs)):
        errors[name] = rel_err(d, d_ref)
    report("B1 T65536", errors)
    assert max(errors.values()) < BF16_TOL, errors


def test_decode_steps_roll_the_cache():
    """64 sequences decoded a token at a time from an fp32 cache give the outputs of one pass, bit for bit."""
    B, T, C, W = 64, 8, 4608, 4
    _, x = projection_view(B, T, C, dtype=torch.bfloat16, device="cuda")
    weight, cache = conv_parameters(C, W, B, device="cuda")
    cache = cache.detach()
    with torch.no_grad():
        y, final = causal_conv1d(x, weight, initial_state=cache, output_final_state=True)
        steps = []
        for t in range(T):
            y_t, cache = causal_conv1d(x[:, t:t + 1], weight, initial_state=cache, output_final_state=True)
            steps.append(y_t)
    assert torch.equal(torch.cat(steps, 1), y) and torch.equal(cache, final)
