"""The "torch" backend of causal_conv1d: PyTorch ops in fp32 (float64 stays float64), differentiable through autograd.

Every input is seen as packed documents (B rows of length T are B documents). The documents' initial
states (W - 1 inputs each) and all tokens are stacked into one table of rows, so each tap of each token
is a row of that table: a token's own input, or its document's state before the document's start. The
row indices are computed on the device, so nothing waits for the GPU and any document lengths work.
"""

import torch
import torch.nn.functional as F


def causal_conv1d_torch(x, weight, initial_state, output_final_state, cu_seqlens, activation, num_sequences):
    B, T, C = x.shape
    W = weight.shape[1]
    N = num_sequences
    compute = torch.promote_types(x.dtype, torch.float32)
    if cu_seqlens is None:
        cu_seqlens = torch.arange(B + 1, device=x.device) * T
    cu_seqlens = cu_seqlens.long()
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    states = x.new_zeros(N, C, W - 1) if initial_state is None else initial_state
    table = torch.cat([states.to(compute).transpose(1, 2).reshape(N * (W - 1), C), x.reshape(B * T, C).to(compute)])

    def rows(document, start, position):
        """Table row of the input at `position` (>= 1 - W) of a document counted from its start."""
        return torch.where(position >= 0, N * (W - 1) + start + position, document * (W - 1) + W - 1 + position)

    tokens = torch.arange(B * T, device=x.device)
    document = torch.searchsorted(ends, tokens, right=True)
    start = starts[document]
    z = sum(table[rows(document, start, tokens - start - (W - 1) + j)] * weight[:, j].to(compute) for j in range(W))
    y = (F.silu(z) if activation == "silu" else z).reshape(B, T, C).to(x.dtype)
    if not output_final_state:
        return y, None
    slots = (ends - starts)[:, None] - (W - 1) + torch.arange(W - 1, device=x.device)
    final = table[rows(torch.arange(N, device=x.device)[:, None], starts[:, None], slots)]  # [N, W - 1, C]
    return y, final.transpose(1, 2).to(states.dtype)
