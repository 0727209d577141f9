"""How the Triton kernels walk sequences: every input is seen as packed documents [1, sum T, H, *]
(B equal rows become B documents), cut into chunks of BT tokens that never cross a document."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

CHUNK = 64  # chunk length; the 16 x 16 block inverse of chunk_prepare.py assumes 64
BT = tl.constexpr(CHUNK)  # the same, as kernels read it


@dataclass
class ChunkLayout:
    cu_seqlens: torch.Tensor     # int32 [N + 1] document offsets
    chunk_indices: torch.Tensor  # int32 [num_chunks, 2]: (document, chunk within it), documents in order
    chunk_offsets: torch.Tensor  # int32 [N]: index of each document's first chunk
    num_chunks: int
    num_seqs: int
    token_starts: list  # host copies of cu_seqlens and of chunk_offsets, each with the end appended [N + 1]
    chunk_starts: list

    def span(self, first_seq, end_seq):
        """(first token, end token, first chunk, end chunk) of documents first_seq .. end_seq - 1."""
        return (self.token_starts[first_seq], self.token_starts[end_seq], self.chunk_starts[first_seq],
                self.chunk_starts[end_seq])


def chunk_layout(B, T, cu_seqlens, device):
    if cu_seqlens is None:  # built on the device: no host copy, no wait for the GPU
        nt = triton.cdiv(T, CHUNK)
        cu = torch.arange(B + 1, device=device, dtype=torch.int32) * T
        seq = torch.arange(B, device=device, dtype=torch.int32).repeat_interleave(nt)
        within = torch.arange(nt, device=device, dtype=torch.int32).repeat(B)
        offsets = torch.arange(B, device=device, dtype=torch.int32) * nt
        return ChunkLayout(cu, torch.stack([seq, within], 1), offsets, B * nt, B, [b * T for b in range(B + 1)],
                           [b * nt for b in range(B + 1)])
    lengths = torch.diff(cu_seqlens.cpu().long())  # host sync: the grid size depends on it
    counts = (lengths + CHUNK - 1) // CHUNK
    offsets = torch.cumsum(counts, 0) - counts
    seq = torch.repeat_interleave(torch.arange(len(counts)), counts)
    within = torch.arange(int(counts.sum())) - offsets[seq]
    chunk_indices = torch.stack([seq, within], 1).to(device=device, dtype=torch.int32).contiguous()
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return ChunkLayout(cu, chunk_indices, offsets.to(device=device, dtype=torch.int32), int(counts.sum()), len(counts),
                       [0] + torch.cumsum(lengths, 0).tolist(), [0] + torch.cumsum(counts, 0).tolist())


@triton.jit
def chunk_position(cu_seqlens, chunk_indices, i_c):
    """Where global chunk i_c lies: the first token of its document (int64, for pointer arithmetic), the
    document's length, the chunk's first token t0 within it and the positions o_t of its rows (int32, as
    block pointers need)."""
    i_n = tl.load(chunk_indices + i_c * 2)
    i_t = tl.load(chunk_indices + i_c * 2 + 1)
    bos = tl.load(cu_seqlens + i_n)
    seq_len = tl.load(cu_seqlens + i_n + 1) - bos
    bos = bos.to(tl.int64)
    t0 = i_t * BT
    return bos, seq_len, t0, t0 + tl.arange(0, BT)


@triton.jit
def row_block(x, bos, t0, seq_len, i_h, H, D: tl.constexpr, col, BD: tl.constexpr):
    """Block pointer to the [BT, BD] tile (rows t0.., columns col..) of head i_h of a [T, H, D] tensor
    whose document starts at token bos; rows beyond the document and columns beyond D read as zero."""
    return tl.make_block_ptr(x + (bos * H + i_h) * D, (seq_len, D), (H * D, 1), (t0, col), (BT, BD), (1, 0))


@triton.jit
def load_rows(x, bos, t0, seq_len, i_h, H, D: tl.constexpr, BD: tl.constexpr):
    """The chunk's [BT, BD] tile of head i_h, columns 0.., as stored."""
    return tl.load(row_block(x, bos, t0, seq_len, i_h, H, D, 0, BD), boundary_check=(0, 1))


@triton.jit
def load_tokens(x, bos, o_t, seq_len, i_h, H):
    """Per-token values [BT] of head i_h of a [T, H] tensor (zero beyond the document)."""
    return tl.load(x + (bos + o_t) * H + i_h, mask=o_t < seq_len, other=0.)
