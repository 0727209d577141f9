"""fused_recurrent_kla: token-by-token KLA for decoding, with a pool of states updated in place."""

import torch

from ..common.inputs import sequence_bounds
from .inputs import check_inputs, normalized_queries, unit_keys_and_values, use_triton


def fused_recurrent_kla(q, k, v, g, eta, *, scale=None, eps=1e-6, initial_state=None, output_final_state=False,
                        cu_seqlens=None, normalize_q=True, beta_mode="kaczmarz", backend="auto",
                        state_indices=None):
    """KLA one token at a time (decode: one or a few tokens per sequence). Arguments as chunk_kla.

    state_indices (int [N], optional) turns initial_state into a pool of states [slots, H, K, V] fp32,
    as serving engines keep them: sequence n starts from slot state_indices[n], and its final state
    is written back to that slot in place. A negative index marks a padding sequence: it starts from
    zero and writes nothing. The call then returns (o, initial_state), the updated pool, whatever
    output_final_state says; this path is for inference and is not differentiable.
    Without state_indices it returns (o, final_state or None) like chunk_kla, and the torch backend
    is differentiable (the Triton decode kernel is forward-only).
    """
    check_inputs(q, k, v, g, eta, initial_state, cu_seqlens, beta_mode, backend, state_indices)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if use_triton(backend, q, v):
        from .fused_recurrent_triton import fused_recurrent_kla_triton
        return fused_recurrent_kla_triton(q, k, v, g, eta, scale, eps, initial_state, output_final_state,
                                          cu_seqlens, normalize_q, beta_mode, state_indices)
    if state_indices is None:
        o, final = recurrent_kla_torch(q, k, v, g, eta, scale, eps, initial_state, cu_seqlens, normalize_q, beta_mode)
        return o, (final if output_final_state else None)
    with torch.no_grad():
        valid = (state_indices >= 0).view(-1, 1, 1, 1)
        slots = state_indices.clamp(min=0).long()
        o, final = recurrent_kla_torch(q, k, v, g, eta, scale, eps, initial_state[slots] * valid, cu_seqlens,
                                       normalize_q, beta_mode)
        keep = state_indices >= 0
        initial_state[slots[keep]] = final[keep]
    return o, initial_state


def recurrent_kla_torch(q, k, v, g, eta, scale, eps, initial_state, cu_seqlens, normalize_q, beta_mode):
    """fp32 recurrence on unit keys (inputs.py): h = exp(g) h; h += eta kk (vv - kk^T h)^T; o = scale q^T h."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    qn = normalized_queries(q.float(), eps, normalize_q)
    kk, vv = unit_keys_and_values(k.float(), v.float(), eps, beta_mode)
    g, eta = g.float(), eta.float()
    bounds = sequence_bounds(T, B, cu_seqlens)
    h0 = q.new_zeros(len(bounds), H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    outputs, finals = [], []
    rows = [(slice(None), 0, T)] if cu_seqlens is None else [(slice(0, 1), a, b) for _, a, b in bounds]
    for n, (row, start, end) in enumerate(rows):
        h = h0 if cu_seqlens is None else h0[n:n + 1]
        for t in range(start, end):
            h = g[row, t, :, None, None].exp() * h
            error = vv[row, t] - torch.einsum("bhkv,bhk->bhv", h, kk[row, t])
            h = h + torch.einsum("bhk,bhv->bhkv", eta[row, t, :, None] * kk[row, t], error)
            outputs.append(torch.einsum("bhkv,bhk->bhv", h, qn[row, t]) * scale)
        finals.append(h)
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(B, 0, H, V, dtype=torch.float32)
    if cu_seqlens is not None:
        o = o.view(1, T, H, V)
    return o.to(v.dtype), torch.cat(finals, 0)
