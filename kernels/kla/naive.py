"""Float64 token-by-token reference of docs/design.md section 1, written literally (raw keys, Kaczmarz beta).

The other backends use the unit-key form of kernels/kla/inputs.py; this one does not, so the tests
also check that equivalence. States are [N, H, K, V] (the transpose of the V x K matrix S of docs/design.md).
"""

import torch

from ..common.inputs import sequence_bounds


def naive_recurrent_kla(q, k, v, g, eta, *, scale=None, eps=1e-6, initial_state=None, output_final_state=False,
                        cu_seqlens=None, normalize_q=True, beta_mode="kaczmarz"):
    """Returns (o [B, T, H, V] float64, final_state [N, H, K, V] float64 or None). Differentiable."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, eta = (x.double() for x in (q, k, v, g, eta))
    if normalize_q:
        q = q / torch.sqrt(q.square().sum(-1, keepdim=True) + eps)
    r2 = k.square().sum(-1)                                   # [B, T, H]
    if beta_mode == "kaczmarz":
        beta = eta / (r2 + eps)
    else:                                                     # GDN: unit keys (fla's l2norm), beta = eta
        k = k / torch.sqrt(r2 + eps).unsqueeze(-1)
        beta = eta
    alpha = g.exp()
    bounds = sequence_bounds(T, B, cu_seqlens)
    # all B rows advance together; packed documents (B = 1) one after another
    rows = [(slice(None), 0, T)] if cu_seqlens is None else [(slice(0, 1), a, b) for _, a, b in bounds]
    h0 = q.new_zeros(len(bounds), H, K, V) if initial_state is None else initial_state.double()
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(rows):
        S = h0 if cu_seqlens is None else h0[n:n + 1]
        for t in range(start, end):
            kt, vt = k[row, t, :, :, None], v[row, t, :, None, :]          # [b, H, K, 1], [b, H, 1, V]
            S = alpha[row, t, :, None, None] * S
            prediction = (S * kt).sum(-2, keepdim=True)                  # alpha S_{t-1} k_t
            S = S + beta[row, t, :, None, None] * kt * (vt - prediction)
            outputs.append((S * q[row, t, :, :, None]).sum(-2) * scale)
        finals.append(S)
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(B, 0, H, V)
    return o.reshape(B, T, H, V), (torch.cat(finals) if output_final_state else None)
