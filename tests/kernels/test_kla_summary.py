"""chunk_kla_summary: h_out = transition @ h_in + zero_start_state for every sequence or packed document."""

import pytest
import torch

from kernels import chunk_kla_summary, naive_recurrent_kla
from kla_testing import make_inputs, rel_err

FP32_TOL = 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("beta_mode", ["kaczmarz", "sigmoid"])
@pytest.mark.parametrize("cu_seqlens", [None, [0, 70, 75, 140]], ids=["rows", "packed"])
def test_summary_reproduces_the_final_state(backend, beta_mode, cu_seqlens):
    B, T = (2, 70) if cu_seqlens is None else (1, 140)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    q, k, v, g, eta, h_in = make_inputs(B, T, 2, 16, 32, states=N, seed=7)
    _, ref = naive_recurrent_kla(q, k, v, g, eta, initial_state=h_in, output_final_state=True, cu_seqlens=offsets,
                                 beta_mode=beta_mode)
    transition, zero_start_state = chunk_kla_summary(k, v, g, eta, cu_seqlens=offsets, beta_mode=beta_mode,
                                                     backend=backend)
    assert transition.shape == (N, 2, 16, 16) and zero_start_state.shape == (N, 2, 16, 32)
    assert transition.dtype == zero_start_state.dtype == torch.float32
    assert rel_err(transition @ h_in + zero_start_state, ref) < FP32_TOL
    # the transition alone: the final state from h_in with zero values
    _, ref_transition = naive_recurrent_kla(q, k, torch.zeros_like(v), g, eta, initial_state=h_in,
                                            output_final_state=True, cu_seqlens=offsets, beta_mode=beta_mode)
    assert rel_err(transition @ h_in, ref_transition) < FP32_TOL
