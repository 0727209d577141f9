"""Chunkwise-parallel KLA in PyTorch (the "torch" backend): fp32, differentiable through autograd.

Within a chunk of C tokens (gc = cumulative log decay inside the chunk, gl its last value) the
gated delta rule on unit keys kk, values vv, step beta has the WY/UT form used by fla:

    L  = strict_lower(beta_i <kk_i, kk_j> exp(gc_i - gc_j)),   T = (I + L)^-1
    w  = T (beta exp(gc) kk),   u = T (beta vv)
    vn = u - w h                                 (h: state [K, V] at the chunk start)
    o  = scale [(q exp(gc)) h + lower(<q_i, kk_j> exp(gc_i - gc_j)) vn]
    h' = exp(gl) h + (kk exp(gl - gc))^T vn

Every exponent is <= 0, so nothing overflows. The Triton kernels compute the same stages.
"""

import torch
import torch.nn.functional as F

from ..common.inputs import sequence_bounds
from .inputs import normalized_queries, unit_keys_and_values

CHUNK = 64


def decay_matrix(gc, include_diagonal):
    """exp(gc_i - gc_j) on (i >= j) or (i > j), 0 elsewhere; masked before exp so it never overflows."""
    C = gc.shape[-1]
    mask = torch.ones(C, C, dtype=torch.bool, device=gc.device).tril(0 if include_diagonal else -1)
    diff = gc.unsqueeze(-1) - gc.unsqueeze(-2)
    return diff.masked_fill(~mask, float("-inf")).exp()


def chunk_gated_delta_rule_torch(qn, kk, vv, g, beta, scale, h0, chunk_size=CHUNK):
    """qn, kk [B, T, H, K], vv [B, T, H, V], g, beta [B, T, H], h0 [B, H, K, V]; all fp32 -> (o, h_T)."""
    B, T, H, K = kk.shape
    V = vv.shape[-1]
    C = chunk_size
    if T == 0:
        return vv.new_zeros(B, 0, H, V), h0
    pad = -T % C  # zero keys, step and decay leave the state untouched, so padding is exact
    if pad:
        qn, kk, vv = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (qn, kk, vv))
        g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    NT = (T + pad) // C
    # [B, H, NT, C, D]
    qn, kk, vv = (x.view(B, NT, C, H, -1).permute(0, 3, 1, 2, 4) for x in (qn, kk, vv))
    g, beta = (x.view(B, NT, C, H).permute(0, 3, 1, 2) for x in (g, beta))
    gc = g.cumsum(-1)
    gl = gc[..., -1:]
    L = beta.unsqueeze(-1) * (kk @ kk.transpose(-1, -2)) * decay_matrix(gc, include_diagonal=False)
    I_plus_L = L + torch.eye(C, dtype=L.dtype, device=L.device)
    w = torch.linalg.solve_triangular(I_plus_L, (beta * gc.exp()).unsqueeze(-1) * kk, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(I_plus_L, beta.unsqueeze(-1) * vv, upper=False, unitriangular=True)
    attn = (qn @ kk.transpose(-1, -2)) * decay_matrix(gc, include_diagonal=True)
    q_decayed = qn * gc.exp().unsqueeze(-1)
    k_to_end = kk * (gl - gc).exp().unsqueeze(-1)
    h = h0
    outputs = []
    for c in range(NT):
        vn = u[:, :, c] - w[:, :, c] @ h
        outputs.append(scale * (q_decayed[:, :, c] @ h + attn[:, :, c] @ vn))
        h = gl[:, :, c, :, None].exp() * h + k_to_end[:, :, c].transpose(-1, -2) @ vn
    o = torch.stack(outputs, 2).permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, h


def chunk_kla_torch(q, k, v, g, eta, scale, eps, initial_state, output_final_state, cu_seqlens, normalize_q,
                    beta_mode):
    B, T, H, K = k.shape
    V = v.shape[-1]
    qn = normalized_queries(q.float(), eps, normalize_q)
    kk, vv = unit_keys_and_values(k.float(), v.float(), eps, beta_mode)
    g, eta = g.float(), eta.float()
    if cu_seqlens is None:
        h0 = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
        o, h = chunk_gated_delta_rule_torch(qn, kk, vv, g, eta, scale, h0)
        finals = h
    else:
        outputs, final_list = [], []
        for n, (_, start, end) in enumerate(sequence_bounds(T, B, cu_seqlens)):
            h0 = q.new_zeros(1, H, K, V, dtype=torch.float32) if initial_state is None else initial_state[n:n + 1].float()
            part = slice(start, end)
            o_n, h_n = chunk_gated_delta_rule_torch(qn[:, part], kk[:, part], vv[:, part], g[:, part],
                                                    eta[:, part], scale, h0)
            outputs.append(o_n)
            final_list.append(h_n)
        o, finals = torch.cat(outputs, 1), torch.cat(final_list, 0)
    return o.to(v.dtype), (finals if output_final_state else None)
