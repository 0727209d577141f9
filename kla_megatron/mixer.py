"""The KLA token mixer (and its GDN twin) as a megatron-core module, sharded by head for TP.

The math lives in `kla_megatron.mixer_math` (shared with the Hugging Face export); this module owns the
parameters, their initialisation and checkpoint layout, and megatron's two projections around `mix`.

Context parallelism (a process group of several ranks in `pg_collection.cp`) gives each rank a contiguous slice
of every sequence; `mix` passes the conv's left context and the recurrent state between the ranks.

Tensor parallelism splits heads: every head-indexed tensor (in_proj rows, conv channels, A_log,
dt_bias, the per-head norm) holds this rank's heads only, so the mixer itself never communicates;
in_proj (column-parallel) and out_proj (row-parallel) do, through megatron's linear layers, which
also carry sequence parallelism.
"""

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
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

from kla_megatron.mixer_math import ContextParallelSlice, MixerShape, mix
from kla_megatron.norms import param_device

BetaMode = Literal["kaczmarz", "sigmoid"]


@dataclass
class KLAMixerSubmodules:
    in_proj: Union[ModuleSpec, type]
    out_proj: Union[ModuleSpec, type]


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
        self.kernel_backend = kernel_backend
        self.keep_states = keep_states
        self.cp_group = pg_collection.cp if pg_collection.cp.size() > 1 else None
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
        self.shape = MixerShape(self.local_heads, self.key_dim, self.value_dim, beta_mode, eps, config.layernorm_epsilon)
        # Local widths of [q | k | v | z | b | a]: the layout of this rank's in_proj rows.
        self.in_proj_split = self.shape.projection_split
        self.conv_channels = self.shape.conv_channels
        H, V = self.local_heads, self.value_dim

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
        cu_seqlens = None if packed_seq_params is None else packed_seq_params.cu_seqlens_q
        context_parallel = None
        if self.cp_group is not None:  # packed documents say whether the first one began on an earlier rank
            continues = getattr(packed_seq_params, "first_document_continues", True)
            context_parallel = ContextParallelSlice(self.cp_group, continues)
        projected, _ = self.in_proj(hidden_states)  # [s, b, local width]
        y, _ = mix(projected.transpose(0, 1), self.conv_weight, self.A_log, self.dt_bias, self.norm_weight, self.shape,
                   cu_seqlens=cu_seqlens, context_parallel=context_parallel, time_major_output=True,
                   backend=self.kernel_backend, keep_states=self.keep_states)
        return self.out_proj(y)

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
