"""Float64 token-by-token reference of causal_conv1d, written as a decoder runs it: each sequence keeps a
window of its last W - 1 inputs (the initial state at first), every token is appended and the output is
the weighted sum of the W newest inputs."""

import torch
import torch.nn.functional as F

from ..common.inputs import sequence_bounds


def naive_causal_conv1d(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                        activation="silu"):
    """Arguments as causal_conv1d. Returns (y [B, T, C] float64, final_state [N, C, W - 1] float64 or None).
    Differentiable."""
    B, T, C = x.shape
    W = weight.shape[1]
    x, weight = x.double(), weight.double()
    bounds = sequence_bounds(T, B, cu_seqlens)
    # all B rows advance together; packed documents (B = 1) one after another
    rows = [(slice(None), 0, T)] if cu_seqlens is None else [(slice(0, 1), a, b) for _, a, b in bounds]
    h0 = x.new_zeros(len(bounds), C, W - 1) if initial_state is None else initial_state.double()
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(rows):
        window = list((h0 if cu_seqlens is None else h0[n:n + 1]).unbind(-1))  # oldest first, each [b, C]
        for t in range(start, end):
            window.append(x[row, t])
            z = sum(weight[:, j] * window[j - W] for j in range(W))
            outputs.append(F.silu(z) if activation == "silu" else z)
        finals.append(torch.stack(window[1 - W:], -1))
    y = torch.stack(outputs, 1).reshape(B, T, C)
    return y, (torch.cat(finals) if output_final_state else None)
