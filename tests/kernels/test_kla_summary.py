"""chunk_kla_summary: h_out = transition @ h_in + zero_start_state, and its gradients."""

import pytest

from kernels import chunk_kla_summary, naive_recurrent_kla
from kla_testing import grads, make_inputs, rel_err

FP32_TOL = 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("beta_mode", ["kaczmarz", "sigmoid"])
def test_summary_reproduces_the_final_state(backend, beta_mode):
    inputs = make_inputs(2, 70, 1, 16, 32, states=2, seed=7, requires_grad=True)
    q, k, v, g, eta, h_in = inputs
    _, ref = naive_recurrent_kla(q, k, v, g, eta, initial_state=h_in, output_final_state=True, beta_mode=beta_mode)
    transition, zero_start_state = chunk_kla_summary(k, v, g, eta, beta_mode=beta_mode, backend=backend)
    assert transition.shape == (2, 1, 16, 16) and zero_start_state.shape == (2, 1, 16, 32)
    composed = transition @ h_in + zero_start_state
    assert rel_err(composed, ref) < FP32_TOL
    wrt = [k, v, g, eta, h_in]
    for d, d_ref in zip(grads([composed], wrt), grads([ref], wrt)):
        assert rel_err(d, d_ref) < FP32_TOL
