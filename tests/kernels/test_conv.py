"""causal_conv1d against the float64 token-by-token reference, on CPU (Triton through TRITON_INTERPRET=1, tiny
shapes). Relative errors ||x - ref|| / ||ref||: fp32 1e-5 (measured about 1e-7), bf16 5e-3."""

import pytest
import torch

from conv_testing import BF16_TOL, FP32_TOL, check_against_reference, conv_parameters, projection_view
from kernels import causal_conv1d, naive_causal_conv1d
from kernels.conv import conv1d_triton
from kla_testing import grads, rel_err

BACKENDS = ["torch", "triton"]


@pytest.fixture
def small_blocks(monkeypatch):
    """Programs of 8 tokens x 16 channels, so tiny inputs span several programs and channel blocks, walks cross
    document starts, and the loads run ahead of the walk (and the unrolled loop) by more than a walk's remainder."""
    monkeypatch.setitem(conv1d_triton.LAUNCH, "fwd", dict(L=8, BC=16, AHEAD=3, UNROLL=2, num_warps=1))
    monkeypatch.setitem(conv1d_triton.LAUNCH, "bwd", dict(L=8, BC=16, AHEAD=5, UNROLL=3, num_warps=1))
    monkeypatch.setattr(conv1d_triton, "SEQUENCE_BC", 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W", [2, 4, 5])
def test_matches_reference(backend, W):
    check_against_reference(backend, 2, 21, 24, W)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [True, False])
def test_packed_documents_never_reach_across_a_start(backend, with_state, small_blocks):
    """Documents shorter than W, an empty one, one at each end; every document starts from its own state."""
    check_against_reference(backend, 1, 40, 20, 4, cu_seqlens=[0, 1, 3, 3, 12, 13, 30, 40], with_state=with_state)


@pytest.mark.parametrize("W", [4, 8])
def test_several_programs(W, small_blocks):
    check_against_reference("triton", 1, 29, 24, W)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [[24], [8, 8, 8], [5, 19], [3, 17, 20]])
def test_output_in_parts(backend, split, small_blocks):
    """y as separate contiguous channel groups (the mixer's q, k, v): parts narrower than a channel block, and
    ones that end inside a block, each with its own blocks; states in and out, gradients through every part."""
    check_against_reference(backend, 2, 21, sum(split), 4, output_split=split)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_in_parts_of_packed_documents(backend, small_blocks):
    check_against_reference(backend, 1, 40, 20, 4, cu_seqlens=[0, 1, 3, 3, 12, 13, 30, 40], output_split=[6, 6, 8])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_activation(backend):
    check_against_reference(backend, 2, 13, 24, 4, activation=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    check_against_reference(backend, 2, 29, 24, 4, dtype=dtype, tol=BF16_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shorter_than_the_window(backend):
    """T < W - 1: the final state keeps some of the initial state's inputs (and their gradient)."""
    check_against_reference(backend, 3, 2, 16, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_pieces_with_the_state_carried_equal_one(backend):
    """As context parallelism runs it: the second piece starts from the first's final state; outputs, final state
    and all gradients (to x, weight, the first piece's initial state) equal one run over the whole sequence."""
    B, T, C, W, split = 2, 19, 24, 4, 7
    proj, x = projection_view(B, T, C)
    weight, h0 = conv_parameters(C, W, B)
    options = dict(output_final_state=True, backend=backend)
    y, final = causal_conv1d(x, weight, initial_state=h0, **options)
    y1, state = causal_conv1d(x[:, :split], weight, initial_state=h0, **options)
    y2, final2 = causal_conv1d(x[:, split:], weight, initial_state=state, **options)
    pieces = torch.cat([y1, y2], 1)
    assert rel_err(pieces, y) < FP32_TOL and rel_err(final2, final) < FP32_TOL
    for d_pieces, d_whole in zip(grads([pieces, final2], [proj, weight, h0]), grads([y, final], [proj, weight, h0])):
        assert rel_err(d_pieces, d_whole) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_decode_steps_roll_the_cache(backend, state_dtype):
    """T = 1 steps from a cache give the outputs of one pass; the cache keeps its dtype (fp32 caches stay exact)."""
    B, T, C, W = 3, 6, 16, 4
    _, x = projection_view(B, T, C, dtype=torch.bfloat16)
    weight, cache = conv_parameters(C, W, B, state_dtype=state_dtype)
    cache = cache.detach()
    y, final = causal_conv1d(x, weight, initial_state=cache, output_final_state=True, backend=backend)
    steps = []
    for t in range(T):
        y_t, cache = causal_conv1d(x[:, t:t + 1], weight, initial_state=cache, output_final_state=True, backend=backend)
        assert cache.dtype == state_dtype
        steps.append(y_t)
    assert torch.equal(torch.cat(steps, 1), y) and torch.equal(cache, final)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_decode_step(backend):
    """One token per document (cu_seqlens), each from its own cache row: the batched decode of packed prompts."""
    C, W, N = 16, 4, 3
    _, x = projection_view(1, N, C)
    weight, cache = conv_parameters(C, W, N)
    cu_seqlens = torch.arange(N + 1)
    y, final = causal_conv1d(x, weight, initial_state=cache, output_final_state=True, cu_seqlens=cu_seqlens,
                             backend=backend)
    y_ref, final_ref = naive_causal_conv1d(x, weight, initial_state=cache, output_final_state=True,
                                           cu_seqlens=cu_seqlens)
    assert rel_err(y, y_ref) < FP32_TOL and rel_err(final, final_ref) < FP32_TOL


def test_backends_agree_on_a_bf16_weight():
    """The weight's gradient comes back in the weight's dtype, summed in fp32."""
    _, x = projection_view(2, 11, 24, dtype=torch.bfloat16)
    weight = torch.randn(24, 4, dtype=torch.bfloat16, requires_grad=True)
    dws = [torch.autograd.grad(causal_conv1d(x, weight, backend=backend)[0].float().square().sum(), weight)[0]
           for backend in BACKENDS]
    assert all(dw.dtype == torch.bfloat16 for dw in dws)
    assert rel_err(dws[1], dws[0]) < BF16_TOL


@pytest.mark.parametrize("change, message", [
    (dict(activation="gelu"), "activation"),
    (dict(backend="cuda"), "backend"),
    (dict(x=torch.randn(2, 5)), r"x must be \[B, T, C\]"),
    (dict(x=torch.randn(2, 5, 8, dtype=torch.float64)), "fp32/bf16/fp16"),
    (dict(x=torch.randn(2, 0, 8)), "at least one token"),
    (dict(weight=torch.randn(7, 4)), "weight must be"),
    (dict(weight=torch.randn(8, 9)), "width"),
    (dict(weight=torch.randn(8, 1)), "width"),
    (dict(cu_seqlens=torch.tensor([0, 2, 5])), "B == 1"),
    (dict(initial_state=torch.randn(2, 8, 4)), "initial_state"),
    (dict(initial_state=torch.randn(2, 8, 3, dtype=torch.float64)), "initial_state"),
    (dict(output_split=[4, 3]), "output_split"),
    (dict(output_split=[2, 2, 2, 2]), "output_split"),
    (dict(output_split=[8, 0]), "output_split"),
])
def test_bad_arguments_are_refused(change, message):
    arguments = {"x": torch.randn(2, 5, 8), "weight": torch.randn(8, 4), **change}
    with pytest.raises(ValueError, match=message):
        causal_conv1d(arguments.pop("x"), arguments.pop("weight"), **arguments)


@pytest.mark.parametrize("split", [None, [8, 8, 8]])
def test_gradient_written_into_the_callers_tensor(split, small_blocks):
    """grad_x_into: the backward writes x's gradient through the strides of a slice of a wider time-major buffer
    (as the mixer's gradient of its projection) and returns it; nothing else of the buffer changes."""
    check_against_reference("triton", 2, 21, 24, 4, output_split=split, gradient_in_place=True)


def test_gradient_written_into_the_callers_tensor_with_packed_documents(small_blocks):
    check_against_reference("triton", 1, 40, 20, 4, cu_seqlens=[0, 1, 3, 3, 12, 13, 30, 40], output_split=[6, 6, 8],
                            gradient_in_place=True)


def test_a_gradient_destination_that_does_not_fit_is_named():
    _, x = projection_view(1, 9, 8)
    weight, _ = conv_parameters(8, 4, 1, with_state=False)
    y, _ = causal_conv1d(x, weight, grad_x_into=lambda: torch.empty(1, 9, 7), backend="triton")
    with pytest.raises(ValueError, match=r"grad_into gave a \(1, 9, 7\) torch.float32 tensor"):
        y.sum().backward()
