"""What context-parallel ranks exchange. Rank r of `group` holds the r-th contiguous slice of every
sequence; process groups are passed in, never looked up.

- gather_from_ranks: the one collective of the recurrence's state passing (kernels/kla/context_parallel.py).
- conv_halo: the last width - 1 tokens before this rank's slice, the left context of the short causal
  convolution before the recurrence (its `initial_state`), with their gradients sent back in the backward.
- local_documents: a rank's view of documents packed along the whole sequence.
"""

import torch
import torch.distributed as dist

# torch >= 2.13 names the single-tensor all-gather all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_from_ranks(x, group):
    """[ranks, *x.shape]: x from every rank of `group`, in rank order; one all-gather."""
    out = x.new_empty(dist.get_world_size(group) * x.numel())
    _all_gather(out, x.contiguous().flatten(), group=group)
    return out.view(-1, *x.shape)


def local_documents(cu_seqlens, start, end):
    """A rank's slice [start, end) of tokens whose documents are packed at global offsets cu_seqlens
    (host ints or tensor): (its local offsets, int32 tensor, and first_document_continues, i.e. whether its
    first document began before start)."""
    offsets = [int(x) for x in cu_seqlens]
    inside = [x - start for x in offsets if start < x < end]
    return torch.tensor([0, *inside, end - start], dtype=torch.int32), start not in offsets


def last_document_mask(T, width, cu_seqlens, device):
    """[width - 1] bool: which of the slice's last width - 1 tokens lie in its last document (all without
    documents). Compared on the device, so the offsets need not come to the host."""
    positions = torch.arange(T - width + 1, T, device=device)
    return positions >= (0 if cu_seqlens is None else cu_seqlens[-2])


class ConvHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, width, group, cu_seqlens, first_document_continues):
        B, T, C = x.shape
        rank, ranks = dist.get_rank(group), dist.get_world_size(group)
        mask = last_document_mask(T, width, cu_seqlens, x.device)
        tails = gather_from_ranks(x[:, T - width + 1:].transpose(1, 2) * mask, group)
        receives = rank > 0 and first_document_continues
        halo = tails[rank - 1] if receives else torch.zeros_like(tails[0])
        if cu_seqlens is not None:  # one row per document; only the first can continue from the previous rank
            halo = torch.cat([halo, halo.new_zeros(cu_seqlens.numel() - 2, C, width - 1)])
        ctx.mask, ctx.group, ctx.packed, ctx.receives, ctx.sends = mask, group, cu_seqlens is not None, receives, \
            rank + 1 < ranks
        return x, halo

    @staticmethod
    def backward(ctx, dx, dhalo):
        rank = dist.get_rank(ctx.group)
        dhalo = dhalo[:1] if ctx.packed else dhalo  # packed: the first document's row
        dtails = gather_from_ranks(dhalo if ctx.receives else torch.zeros_like(dhalo), ctx.group)
        if ctx.sends:
            dx = dx.contiguous()  # a copy only if the gradient arrives strided or expanded
            width = dhalo.shape[-1] + 1
            dx[:, dx.shape[1] - width + 1:] += (dtails[rank + 1] * ctx.mask).transpose(1, 2).to(dx.dtype)
        return dx, None, None, None, None


def conv_halo(x, width, *, group, cu_seqlens=None, first_document_continues=True):
    """The left context of a causal convolution of `width` taps over this rank's slice x [B, T, C] (may be a
    strided view): (x, halo). halo [N, C, width - 1] holds the previous rank's last width - 1 tokens, zero on
    rank 0, before a document start and where this rank's first document starts fresh; N = B, or the number
    of documents of cu_seqlens (this rank's offsets, B = 1), of which only the first row can be nonzero.
    That is the `initial_state` of kernels.conv's causal_conv1d. Use the returned x as the convolution's
    input: its backward adds the halo's gradients, received from the next rank, to the last width - 1
    tokens in place, so no gradient the size of x is made for the halo."""
    B, T, C = x.shape
    if width < 2:
        raise ValueError(f"a convolution of width {width} has no left context to exchange")
    if T < width - 1:
        raise ValueError(f"each rank needs at least width - 1 = {width - 1} tokens of the sequence, this one has {T}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens packs documents along T and needs B == 1, got B = {B}")
    return ConvHalo.apply(x, width, group, cu_seqlens, first_document_continues)
