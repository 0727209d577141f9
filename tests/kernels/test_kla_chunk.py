"""chunk_kla against the float64 token-by-token reference, on CPU (Triton through TRITON_INTERPRET=1,
at shapes with few (chunk, head) programs: the interpreter takes about a second for each).

Tolerances are relative errors ||x - ref|| / ||ref||: fp32 inputs 1e-4 (outputs, states, every
gradient), bf16 inputs 1e-2, as issue 4 asks."""

import pytest
import torch

from kernels import chunk_kla
from kla_testing import check_against_reference, grads, make_inputs

BACKENDS = ["torch", "triton"]
BF16_TOL = 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta_mode", ["kaczmarz", "sigmoid"])
@pytest.mark.parametrize("key_scale", [1e-3, 1.0, 1e3])
def test_matches_reference_over_key_scales(backend, beta_mode, key_scale):
    check_against_reference(backend, 1, 77, 2, 16, 32, key_scale=key_scale, beta_mode=beta_mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiple_chunks_odd_length_unequal_head_dims(backend):
    check_against_reference(backend, 1, 150, 1, 24, 40, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_documents_restart_the_state(backend):
    # an empty document, one shorter than a chunk, one crossing chunk borders
    check_against_reference(backend, 1, 140, 1, 16, 32, cu_seqlens=[0, 5, 5, 71, 140], seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_keys_without_decay(backend):
    """The hardest case for the chunk inverse: one key repeated, steps near 1, no decay, so L is
    nearly all ones and (I + L)^-1 comes from heavy cancellation."""
    def repeat_first_key(q, k, v, g, eta):
        return q, k[:, :1].expand_as(k).contiguous(), v, torch.zeros_like(g), torch.full_like(eta, 0.99)
    check_against_reference(backend, 1, 100, 1, 16, 16, seed=8,
                            change_inputs=repeat_first_key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_states_or_query_norm(backend):
    check_against_reference(backend, 2, 40, 1, 16, 16, with_states=False, normalize_q=False, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    check_against_reference(backend, 1, 100, 1, 32, 32, dtype=torch.bfloat16, tol=BF16_TOL, seed=6)


def test_recomputed_states_give_the_same_gradients_as_kept_ones():
    """keep_states=False reruns fwd_wu and fwd_h in the backward; they are deterministic, so every
    gradient must equal the kept-states run bit for bit."""
    inputs = make_inputs(1, 150, 2, 16, 32, dtype=torch.bfloat16, states=1, requires_grad=True, seed=7)
    q, k, v, g, eta, h0 = inputs
    gradients = [grads(chunk_kla(q, k, v, g, eta, initial_state=h0, output_final_state=True, backend="triton",
                                 keep_states=keep), inputs) for keep in (True, False)]
    for kept, recomputed in zip(*gradients):
        assert torch.equal(kept, recomputed)


def test_final_state_is_optional_and_outputs_keep_dtype():
    q, k, v, g, eta = make_inputs(1, 10, 1, 8, 8, dtype=torch.bfloat16)
    o, ht = chunk_kla(q, k, v, g, eta)
    assert ht is None and o.dtype == torch.bfloat16


@pytest.mark.parametrize("change, message", [
    (dict(beta_mode="relu"), "beta_mode"),
    (dict(backend="cuda"), "backend"),
    (dict(k=torch.zeros(1, 10, 2, 9)), "same shape"),
    (dict(v=torch.zeros(1, 11, 2, 8)), "v must be"),
    (dict(g=torch.zeros(1, 10, 2, 1)), "g must be"),
    (dict(initial_state=torch.zeros(2, 2, 8, 8)), "initial_state"),
    (dict(cu_seqlens=torch.tensor([0, 10]), B=2), "B == 1"),
])
def test_invalid_arguments_raise_clear_errors(change, message):
    B = change.pop("B", 1)
    q, k, v, g, eta = make_inputs(B, 10, 2, 8, 8)
    arguments = dict(q=q, k=k, v=v, g=g, eta=eta)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        chunk_kla(**arguments)
