"""The KLA / GDN token mixer's math, with no megatron: the one source that training (kla_megatron.mixer),
context parallelism and the Hugging Face export (which ships a copy of this file) all call.

Per layer, from the input projection [q | k | v | z | b | a] of each token:

    q, k, v = SiLU(causal_depthwise_conv1d(q, k, v))        # kernel W, per channel
    g       = -exp(A_log) * softplus(a + dt_bias)            # log decay, fp32
    eta     = sigmoid(b)                                     # step in (0, 1)
    o       = recurrence(q, k, v, g, eta)                    # q L2-normalised; kaczmarz: beta = eta / (||k||^2 + eps)
    y       = RMSNorm_per_head(o) * norm_weight * SiLU(z)    # then the output projection

Heads are the projection's own: under tensor parallelism a rank passes its heads' slice. The recurrent cache of
a layer (`MixerState`) is the conv's last W-1 inputs and the recurrence state, so decoding costs O(1) a token.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels import causal_conv1d, chunk_kla, chunk_kla_context_parallel, conv_halo, fused_recurrent_kla, rms_norm


def _stage(name: str):
    """A named range for torch.profiler (the training profile's per-component table reads the prefix)."""
    return torch.profiler.record_function(f"component::mixer: {name}")


@dataclass(frozen=True)
class MixerShape:
    heads: int
    """Heads of this mixer (this rank's, under tensor parallelism)."""
    key_dim: int
    value_dim: int
    beta_mode: str = "kaczmarz"
    """kaczmarz: KLA (raw keys, beta = eta / (||k||^2 + eps)); sigmoid: GDN (unit keys, beta = eta)."""
    eps: float = 1e-6
    norm_eps: float = 1e-6

    @property
    def projection_split(self) -> list:
        """Widths of the input projection's parts [q | k | v | z | b | a], all heads of a part together."""
        H, K, V = self.heads, self.key_dim, self.value_dim
        return [H * K, H * K, H * V, H * V, H, H]

    @property
    def conv_channels(self) -> int:
        return 2 * self.heads * self.key_dim + self.heads * self.value_dim


@dataclass(frozen=True)
class ContextParallelSlice:
    """This rank's place in a sequence split over a context-parallel group: rank r holds the r-th contiguous
    slice. first_document_continues: whether its first (packed) document began on an earlier rank."""

    group: object
    first_document_continues: bool = True


@dataclass
class MixerState:
    """One layer's recurrent cache for N sequences."""

    conv: torch.Tensor
    """[N, conv_channels, W - 1]: the last conv inputs (pre-activation q, k, v projections)."""
    recurrent: torch.Tensor
    """[N, H, K, V] fp32: the recurrence state (the transpose of the V x K matrix S_t: keys index rows)."""


class GradientAssembly:
    """The gradient of a ColumnSplit's input, which the backward passes that consume its parts can write in place.
    `destination(i)` is the function a Triton backward (the conv's, the gated norm's) calls for the tensor to write
    part i's gradient into: that part of one buffer laid out like the input, allocated at the first call."""

    def __init__(self, like: torch.Tensor, widths: tuple):
        # The layout torch.empty_like would give (the input's strides, when it is dense), without holding the input.
        self.layout, self.device = torch.empty_like(like, device="meta"), like.device
        self.widths = widths
        self.buffer = None

    def destination(self, i: int):
        return lambda: self._buffer().split(self.widths, dim=-1)[i]

    def _buffer(self):
        if self.buffer is None:
            self.buffer = torch.empty_strided(self.layout.shape, self.layout.stride(), dtype=self.layout.dtype,
                                              device=self.device)
        return self.buffer

    def take(self) -> torch.Tensor:
        """The buffer, for ColumnSplit's backward; the next backward through the same graph starts a new one."""
        buffer, self.buffer = self._buffer(), None
        return buffer


class ColumnSplit(torch.autograd.Function):
    """torch.split along the last dimension, whose backward returns the parts' gradients as one tensor laid out like
    the input: for megatron's projection, a transposed view of a [T, B, W] tensor, that is a [T, B, W] contiguous
    gradient, which the linear layer's backward takes as it is. (torch.split's backward concatenates into a
    [B, T, W] tensor, which that backward copies twice to bring to its own layout.) A part's gradient that its
    consumer wrote in place (GradientAssembly.destination) is not copied; the others are copied in."""

    @staticmethod
    def forward(ctx, x, assembly):
        ctx.assembly = assembly
        ctx.set_materialize_grads(False)
        return x.split(assembly.widths, dim=-1)

    @staticmethod
    def backward(ctx, *grads):
        dx = ctx.assembly.take()
        for part, grad in zip(dx.split(ctx.assembly.widths, dim=-1), grads):
            if grad is None:
                part.zero_()
            elif (grad.data_ptr(), grad.stride()) != (part.data_ptr(), part.stride()):
                part.copy_(grad)
        return dx, None


def column_split(x: torch.Tensor, widths: tuple):
    """(x's parts along the last dimension, the GradientAssembly their consumers may write their gradients into)."""
    assembly = GradientAssembly(x, widths)
    return ColumnSplit.apply(x, assembly), assembly


def decay_and_step(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """(g, eta) in fp32: the log decay -exp(A_log) softplus(a + dt_bias) <= 0 and the step sigmoid(b)."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, torch.sigmoid(b.float())


def mix(projected: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
        norm_weight: torch.Tensor, shape: MixerShape, *, state: Optional[MixerState] = None, output_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
        context_parallel: Optional[ContextParallelSlice] = None, time_major_output: bool = False,
        backend: str = "auto", keep_states: bool = True):
    """The mixer between its two projections.

    projected [B, T, width]: the input projection, any strides with unit feature stride (megatron passes a
    transposed view of its [T, B, width] output; nothing is copied). state: the cache to continue from (None: a
    fresh start); output_state: also return the cache after the last token. cu_seqlens [N + 1] (B = 1): packed
    documents, conv and state restart at each. token_mask [B, T] (1 keep, 0 pad): padded tokens (left padding in
    batched generation) enter neither the conv nor the state. context_parallel: this rank holds one slice of each
    sequence; the conv's left context and the recurrent state come from the ranks before it (no cache then).
    Returns (y, new_state): y [B, T, H V] in projected's dtype, or [T, B, H V] contiguous with time_major_output;
    new_state a MixerState or None.
    """
    H, K, V = shape.heads, shape.key_dim, shape.value_dim
    B, T, _ = projected.shape
    parts, gradient = column_split(projected, (shape.conv_channels, H * V, H, H))
    qkv, z, b, a = parts
    if token_mask is not None:
        qkv = qkv * token_mask[..., None].to(qkv.dtype)
    initial_conv = None if state is None else state.conv
    if context_parallel is not None:
        if state is not None or output_state:
            raise ValueError("a context-parallel slice takes its states from the other ranks, not from a cache")
        with _stage("conv halo"):
            qkv, initial_conv = conv_halo(qkv, conv_weight.shape[1], group=context_parallel.group, cu_seqlens=cu_seqlens,
                                          first_document_continues=context_parallel.first_document_continues)
    with _stage("conv"):  # q, k, v each contiguous: the recurrence reads them and returns their gradients as they are
        (q, k, v), conv_state = causal_conv1d(qkv, conv_weight, initial_state=initial_conv,
                                              output_final_state=output_state, cu_seqlens=cu_seqlens,
                                              output_split=shape.projection_split[:3], backend=backend,
                                              # straight into projected's gradient, unless other ops (padding mask,
                                              # context-parallel halo) stand between the split and the conv
                                              grad_x_into=gradient.destination(0) if qkv is parts[0] else None)
    with _stage("gates"):
        g, eta = decay_and_step(a, b, A_log, dt_bias)
    with _stage("recurrence"):
        options = dict(eps=shape.eps, beta_mode=shape.beta_mode, initial_state=None if state is None else state.recurrent,
                       output_final_state=output_state, cu_seqlens=cu_seqlens, backend=backend)
        if context_parallel is not None:
            o = chunk_kla_context_parallel(q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V), g, eta,
                                           group=context_parallel.group, eps=shape.eps, cu_seqlens=cu_seqlens,
                                           first_document_continues=context_parallel.first_document_continues,
                                           beta_mode=shape.beta_mode, backend=backend, keep_states=keep_states)
            recurrent_state = None
        elif T == 1 and state is not None and not torch.is_grad_enabled():  # a decoding step
            o, recurrent_state = fused_recurrent_kla(q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V),
                                                     g, eta, **options)
        else:
            o, recurrent_state = chunk_kla(q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V), g, eta,
                                           keep_states=keep_states, **options)
    with _stage("norm and gate"):
        y = rms_norm(o.reshape(B, T, H * V), norm_weight, shape.norm_eps, gate=z, group_size=V,
                     transpose_output=time_major_output, grad_gate_into=gradient.destination(1), backend=backend)
    return y, (MixerState(conv_state, recurrent_state) if output_state else None)
