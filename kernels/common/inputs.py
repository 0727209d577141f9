"""Argument handling every op of kernels/ shares: the backend choice, packed documents (cu_seqlens) and where a
backward writes a gradient (grad_into)."""

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_cu_seqlens(cu_seqlens, B):
    """Raise ValueError unless cu_seqlens (or None) can pack documents along T of a batch of B rows.
    Returns the number of sequences N: B, or the number of documents."""
    if cu_seqlens is None:
        return B
    if B != 1:
        raise ValueError(f"cu_seqlens packs documents along T and needs B == 1, got B = {B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N + 1] of document offsets")
    return cu_seqlens.numel() - 1


def use_triton(backend, x, unsupported=None):
    """Resolve backend='auto': Triton on CUDA tensors, torch otherwise. 'triton' on CPU tensors needs
    TRITON_INTERPRET=1. unsupported: why the Triton kernels cannot take these inputs (None if they can)."""
    if backend == "auto":
        return x.is_cuda and unsupported is None
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        if unsupported is not None:
            raise ValueError(unsupported)
        return True
    return False


def sequence_bounds(T, B, cu_seqlens):
    """[(batch row, start, end)] of every sequence: B rows of length T, or the documents of cu_seqlens.
    Reads cu_seqlens on the host: for the references, not for the kernels."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}; got {offsets}")
    return [(0, a, b) for a, b in zip(offsets, offsets[1:])]


def gradient_destination(grad_into, like: torch.Tensor) -> torch.Tensor:
    """The tensor a Triton backward writes the gradient of `like` into: a new contiguous one, or grad_into(), the
    caller's (a part of the gradient of a wider tensor, which then needs no copy to assemble). It is asked for only
    in the backward, so it takes memory only from then; it must match `like`'s shape and dtype, with unit stride in
    the last dimension."""
    if grad_into is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    out = grad_into()
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or out.stride(-1) != 1:
        raise ValueError(f"grad_into gave a {tuple(out.shape)} {out.dtype} tensor on {out.device} with strides "
                         f"{out.stride()}; the gradient is {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"unit last stride")
    return out
