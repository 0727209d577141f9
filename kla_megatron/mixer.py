"""The KLA token mixer (and its GDN twin) as a megatron-core module, sharded by head for TP.

Per layer (docs/design.md, section 1):

    q, k, v = SiLU(causal_depthwise_conv1d(W_q x, W_k x, W_v x))
    z       = W_z x;  a, b = W_a x, W_b x
    g       = -exp(A_log) * softplus(a + dt_bias);  eta = sigmoid(b)
    o       = chunk_kla(q, k, v, g, eta)            # q L2-normalised, beta = eta / (||k||^2 + eps)
    y       = W_o [RMSNorm_per_head(o) * SiLU(z)]

Tensor parallelism splits heads: every head-indexed tensor (in_proj rows, conv channels, A_log,
dt_bias, the per-head norm) holds this rank's heads only, so the mixer itself never communicates;
in_proj (column-parallel) and out_proj (row-parallel) do, through megatron's linear layers, which
also carry sequence parallelism.
"""

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.gated_delta_net import _split_tensor_factory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from kernels import chunk_kla
from kla_megatron.norms import param_device, rms_norm

BetaMode = Literal["kaczmarz", "sigmoid"]


@dataclass
class KLAMixerSubmodules:
    in_proj: Union[ModuleSpec, type]
    out_proj: Union[ModuleSpec, type]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None):
    """Depthwise causal convolution over time. x [B, T, C], weight [C, W]; out[t] = sum_j w[:, j] x[t-W+1+j].

    With `cu_seqlens` (B = 1, packed documents) a tap never reaches back across a document start.
    """
    width = weight.shape[1]
    out = x * weight[:, width - 1]
    if cu_seqlens is not None:
        positions = torch.arange(x.shape[1], device=x.device)
        doc_start = cu_seqlens[torch.searchsorted(cu_seqlens, positions, right=True) - 1]
        offset_in_doc = (positions - doc_start)[None, :, None]
    for shift in range(1, width):
        shifted = F.pad(x, (0, 0, shift, 0))[:, : x.shape[1]]
        if cu_seqlens is not None:
            shifted = shifted * (offset_in_doc >= shift)
        out = out + shifted * weight[:, width - 1 - shift]
    return out


class KLAMixer(MegatronModule):
    """Kaczmarz linear attention (beta_mode="kaczmarz") or Gated DeltaNet (beta_mode="sigmoid").

    Input and output are [s, b, hidden] like megatron's attention; s is this rank's slice under
    sequence parallelism.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: KLAMixerSubmodules,
        layer_number: int = 1,
        beta_mode: BetaMode = "kaczmarz",
        eps: float = 1e-6,
        kernel_backend: str = "auto",
        keep_states: bool = True,
        A_init_range: tuple = (1.0, 16.0),
        dt_init_range: tuple = (1e-3, 0.1),
        pg_collection: Optional[ProcessGroupCollection] = None,
        **unused_attention_kwargs,
    ):
        super().__init__(config)
        if beta_mode not in ("kaczmarz", "sigmoid"):
            raise ValueError(f"beta_mode must be 'kaczmarz' (KLA) or 'sigmoid' (GDN), got {beta_mode!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.layer_number = layer_number
        self.beta_mode = beta_mode
        self.eps = eps
        self.kernel_backend = kernel_backend
        self.keep_states = keep_states
        if pg_collection.cp.size() > 1:
            raise ValueError(
                "KLAMixer has no context-parallel path yet (state passing, docs/design.md section 3.5); set parallel.context=1"
            )
        self.tp_size = pg_collection.tp.size()
        self.tp_rank = pg_collection.tp.rank()
        self.num_heads = config.linear_num_value_heads
        self.key_dim = config.linear_key_head_dim
        self.value_dim = config.linear_value_head_dim
        if self.num_heads % self.tp_size:
            raise ValueError(
                f"the mixer's {self.num_heads} heads cannot be split over tensor_parallel={self.tp_size} ranks: "
                f"choose a tensor-parallel size that divides {self.num_heads}"
            )
        self.local_heads = self.num_heads // self.tp_size
        H, K, V = self.local_heads, self.key_dim, self.value_dim
        # Local widths of [q | k | v | z | b | a]: the layout of this rank's in_proj rows.
        self.in_proj_split = [H * K, H * K, H * V, H * V, H, H]
        self.conv_channels = 2 * H * K + H * V

        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            sum(self.in_proj_split) * self.tp_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=pg_collection.tp,
        )
        self.out_proj = build_module(
            submodules.out_proj,
            self.num_heads * V,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=pg_collection.tp,
        )

        device, dtype = param_device(config), config.params_dtype
        self.conv_weight = torch.nn.Parameter(torch.empty(self.conv_channels, config.linear_conv_kernel_dim, device=device, dtype=dtype))
        self.A_log = torch.nn.Parameter(torch.empty(H, device=device, dtype=dtype))
        self.dt_bias = torch.nn.Parameter(torch.empty(H, device=device, dtype=dtype))
        self.norm_weight = torch.nn.Parameter(torch.ones(H, V, device=device, dtype=dtype))
        for p in (self.conv_weight, self.A_log, self.dt_bias, self.norm_weight):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        for p in (self.A_log, self.dt_bias, self.norm_weight):
            p.no_weight_decay = True
        self.A_init_range = A_init_range
        self.dt_init_range = dt_init_range
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GDN-paper init, drawn for all heads from a per-layer seed and sliced to this rank's heads,
        so a model initialises the same at every TP size."""
        gen = torch.Generator().manual_seed(torch.initial_seed() + self.layer_number)
        heads = slice(self.tp_rank * self.local_heads, (self.tp_rank + 1) * self.local_heads)
        A = torch.empty(self.num_heads).uniform_(*self.A_init_range, generator=gen)
        lo, hi = (math.log(x) for x in self.dt_init_range)
        dt = torch.exp(torch.empty(self.num_heads).uniform_(lo, hi, generator=gen))
        self.A_log.copy_(torch.log(A)[heads])
        self.dt_bias.copy_((dt + torch.log(-torch.expm1(-dt)))[heads])  # inverse softplus
        # nn.Conv1d's default for a depthwise kernel, U(-1/sqrt(W), 1/sqrt(W)), over all heads' channels.
        width = self.conv_weight.shape[1]
        bound = 1.0 / math.sqrt(width)
        conv = []
        for head_dim in (self.key_dim, self.key_dim, self.value_dim):
            full = torch.empty(self.num_heads, head_dim, width).uniform_(-bound, bound, generator=gen)
            conv.append(full[heads].reshape(-1, width))
        self.conv_weight.copy_(torch.cat(conv))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **unused_attention_kwargs,
    ):
        cu_seqlens = None
        if packed_seq_params is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        projected, _ = self.in_proj(hidden_states)  # [s, b, local width]
        projected = projected.transpose(0, 1)  # [b, s, ...]: the kernels' layout
        batch, seq = projected.shape[:2]
        qkv, z, b, a = torch.split(
            projected, [self.conv_channels, self.in_proj_split[3], self.local_heads, self.local_heads], dim=-1
        )
        qkv = F.silu(causal_conv1d(qkv, self.conv_weight, cu_seqlens))
        H, K, V = self.local_heads, self.key_dim, self.value_dim
        q, k, v = torch.split(qkv, self.in_proj_split[:3], dim=-1)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        eta = torch.sigmoid(b.float())
        o, _ = chunk_kla(
            q.reshape(batch, seq, H, K),
            k.reshape(batch, seq, H, K),
            v.reshape(batch, seq, H, V),
            g,
            eta,
            eps=self.eps,
            beta_mode=self.beta_mode,
            cu_seqlens=cu_seqlens,
            backend=self.kernel_backend,
            keep_states=self.keep_states,
        )
        o = rms_norm(o, self.norm_weight, self.config.layernorm_epsilon)
        o = o * F.silu(z.reshape(batch, seq, H, V).float()).to(o.dtype)
        out, out_bias = self.out_proj(o.reshape(batch, seq, H * V).transpose(0, 1).contiguous())
        return out, out_bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, tp_group=None):
        """Checkpoint layout independent of the TP size: each head-indexed tensor is stored whole,
        and in_proj/conv rows are split into named parts (query, key, ...) so TP=2 shards reassemble."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = tp_group if tp_group is not None else self.in_proj.tp_group
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            tensor_parallel_layers_axis_map={"conv_weight": 0, "A_log": 0, "dt_bias": 0, "norm_weight": 0},
            sharded_offsets=sharded_offsets,
            tp_group=tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            sharded.update(
                sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group)
            )
        sharded[f"{prefix}in_proj.weight"] = _split_tensor_factory(
            sharded[f"{prefix}in_proj.weight"], self.in_proj_split, ["query", "key", "value", "z", "eta", "decay"], 0
        )
        sharded[f"{prefix}conv_weight"] = _split_tensor_factory(
            sharded[f"{prefix}conv_weight"], self.in_proj_split[:3], ["query", "key", "value"], 0
        )
        return sharded
