"""fused_recurrent_kla (decode) against the float64 reference, and its in-place state pool."""

import pytest
import torch

from kernels import chunk_kla, fused_recurrent_kla, naive_recurrent_kla
from kla_testing import grads, make_inputs, rel_err

BACKENDS = ["torch", "triton"]
FP32_TOL = 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta_mode", ["kaczmarz", "sigmoid"])
@pytest.mark.parametrize("key_scale", [1e-3, 1e3])
def test_decode_matches_reference(backend, beta_mode, key_scale):
    q, k, v, g, eta, h0 = make_inputs(3, 4, 2, 16, 32, key_scale=key_scale, states=3)
    options = dict(initial_state=h0, output_final_state=True, beta_mode=beta_mode)
    o_ref, ht_ref = naive_recurrent_kla(q, k, v, g, eta, **options)
    o, ht = fused_recurrent_kla(q, k, v, g, eta, backend=backend, **options)
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(ht, ht_ref) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_pool_is_updated_in_place(backend):
    """Sequence n reads and writes slot state_indices[n]; index -1 (padding) starts from zero, writes nothing."""
    slots = 5
    q, k, v, g, eta, pool = make_inputs(1, 6, 2, 16, 32, states=slots, seed=2)
    cu_seqlens = torch.tensor([0, 1, 3, 6])               # a few tokens per sequence, packed
    state_indices = torch.tensor([3, -1, 0])
    expected = pool.clone()
    h0 = torch.stack([pool[3], torch.zeros_like(pool[0]), pool[0]])
    o_ref, ht_ref = naive_recurrent_kla(q, k, v, g, eta, initial_state=h0, output_final_state=True,
                                        cu_seqlens=cu_seqlens)
    expected[3], expected[0] = ht_ref[0].float(), ht_ref[2].float()
    o, returned = fused_recurrent_kla(q, k, v, g, eta, initial_state=pool, cu_seqlens=cu_seqlens,
                                      state_indices=state_indices, backend=backend)
    assert returned is pool
    assert rel_err(o, o_ref) < FP32_TOL
    assert rel_err(pool, expected) < FP32_TOL
    assert torch.equal(pool[[1, 2, 4]], expected[[1, 2, 4]])   # untouched slots stay bit-identical


def test_torch_decode_is_differentiable_and_agrees_with_chunk():
    inputs = make_inputs(2, 9, 2, 8, 16, states=2, requires_grad=True)
    q, k, v, g, eta, h0 = inputs
    o, ht = fused_recurrent_kla(q, k, v, g, eta, initial_state=h0, output_final_state=True, backend="torch")
    o_c, ht_c = chunk_kla(q, k, v, g, eta, initial_state=h0, output_final_state=True, backend="torch")
    for d, d_c in zip(grads([o, ht], inputs), grads([o_c, ht_c], inputs)):
        assert rel_err(d, d_c) < FP32_TOL


def test_state_indices_need_a_pool():
    q, k, v, g, eta = make_inputs(2, 1, 2, 8, 8)
    with pytest.raises(ValueError, match="state_indices"):
        fused_recurrent_kla(q, k, v, g, eta, state_indices=torch.tensor([0, 1]))
