"""Model shapes as typed data, and their translation into megatron-core's TransformerConfig.

A `ModelConfig` names the architecture (which token mixer, how many layers, head sizes); the
parallel layout and precision come from the training config and are joined here in
`transformer_config`, the one place where our settings become megatron's.
"""

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

Mixer = Literal["kla", "gdn", "attention"]

# megatron's selective-recompute modules offered for our layers, and why the others that touch them are not.
RECOMPUTE_MODULES = ("mlp",)
RECOMPUTE_MODULES_NOT_OFFERED = {
    "layernorm": "megatron-core 0.16.1's norm recompute (CheckpointWithoutOutput) takes a Transformer Engine-only FP8 "
                 "path and fails without Transformer Engine, which this project does not use",
    "core_attn": "flash attention keeps only its output and log-sum-exp (no s x s scores), so rebuilding it would save "
                 "little for a second attention forward",
}


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    """The residual stream's width."""
    num_heads: int
    """Heads of the linear-attention mixer and of softmax attention alike."""
    key_head_dim: int
    """K: the width of a KLA/GDN head's keys and queries (its state is K x V)."""
    value_head_dim: int
    """V: the width of a KLA/GDN head's values and outputs."""
    ffn_hidden_size: int
    """The SwiGLU MLP's inner width."""
    mixer: Mixer = "kla"
    """kla: Kaczmarz step on raw keys; gdn: Gated DeltaNet (L2-normalised keys, beta = eta);
    attention: a plain pre-norm transformer with RoPE."""
    attention_every: int = 0
    """Hybrid models: every N-th layer (N, 2N, ...) is softmax attention; 0 keeps all layers `mixer`."""
    attention_head_dim: int = 128
    """Softmax attention layers' head width."""
    conv_kernel: int = 4
    """Width of the causal depthwise convolution over q, k and v."""
    kla_eps: float = 1e-6
    """The eps of beta_t = eta_t / (||k_t||^2 + eps)."""
    norm_eps: float = 1e-6
    """The eps of every RMSNorm."""
    kernel_backend: str = "auto"
    """Backend of our kernels (recurrence, conv, norms, loss): auto (Triton on GPU, PyTorch on CPU), triton, or
    torch (the PyTorch references of every fused op: bench/fusions.py compares the two)."""
    kernel_keep_states: bool = True
    """Triton: keep each layer's per-chunk states for its backward (faster; 2K + 2V + K V / 32 bytes per token
    and head, e.g. 14 MB per 1K tokens per layer at 12 heads of K96 V192); false recomputes them, as fla does."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of the linear and embedding weights."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    rope_base: int = 10000
    """RoPE base of the attention layers (models without attention use no positions)."""

    def __post_init__(self):
        if self.mixer not in ("kla", "gdn", "attention"):
            raise ValueError(f"model.mixer must be 'kla', 'gdn' or 'attention', got {self.mixer!r}")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"model.kernel_backend must be 'auto', 'torch' or 'triton', got {self.kernel_backend!r}")
        sizes = ("num_layers", "hidden_size", "num_heads", "key_head_dim", "value_head_dim", "ffn_hidden_size",
                 "attention_head_dim", "conv_kernel")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.attention_every < 0:
            raise ValueError(f"model.attention_every must be >= 0, got {self.attention_every}")
        if self.hidden_size % self.num_heads and self.mixer == "attention":
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )

    def architecture(self) -> dict:
        """The fields that give trained weights their meaning; not those choosing how the same function
        is computed (kernel_backend, kernel_keep_states) or how a new model starts (init_std)."""
        return {k: v for k, v in asdict(self).items() if k not in ("kernel_backend", "kernel_keep_states", "init_std")}

    def layer_mixer(self, layer_number: int) -> Mixer:
        """Which mixer the 1-based `layer_number` uses."""
        if self.attention_every and layer_number % self.attention_every == 0:
            return "attention"
        return self.mixer

    @property
    def uses_attention(self) -> bool:
        return any(self.layer_mixer(i) == "attention" for i in range(1, self.num_layers + 1))


def _paper_shape(hidden: int, heads: int, layers: int, ffn: int, mixer: Mixer = "kla") -> ModelConfig:
    """The paper's proportions: key width 0.75*hidden, value width 1.5*hidden, split over `heads`."""
    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        key_head_dim=hidden * 3 // 4 // heads,
        value_head_dim=hidden * 3 // 2 // heads,
        ffn_hidden_size=ffn,
        mixer=mixer,
    )


_KLA_0_4B = _paper_shape(hidden=1536, heads=12, layers=11, ffn=6144)

NAMED_MODELS: dict[str, ModelConfig] = {
    # Trains on 2 CPU cores in minutes: the embedded default.
    "tiny": ModelConfig(
        num_layers=2, hidden_size=128, num_heads=4, key_head_dim=24, value_head_dim=48,
        ffn_hidden_size=384, attention_head_dim=32,
    ),
    "tiny-gdn": ModelConfig(
        num_layers=2, hidden_size=128, num_heads=4, key_head_dim=24, value_head_dim=48,
        ffn_hidden_size=384, attention_head_dim=32, mixer="gdn",
    ),
    # The paper's 0.4B shape (lit-gpt RelaxedKaczmarzQNorm_0.4B), its GDN twin and a transformer of
    # the same width, depth and MLP.
    "kla-0.4b": _KLA_0_4B,
    "gdn-0.4b": replace(_KLA_0_4B, mixer="gdn"),
    "hybrid-0.4b": replace(_KLA_0_4B, attention_every=4),
    "transformer-0.4b": replace(_KLA_0_4B, mixer="attention"),
    # Multi-node sizes, same proportions.
    "kla-1.3b": _paper_shape(hidden=2048, heads=16, layers=24, ffn=8192),
    "kla-2.7b": _paper_shape(hidden=2560, heads=20, layers=32, ffn=10240),
    "kla-7b": _paper_shape(hidden=4096, heads=32, layers=32, ffn=14336),
}


def named_model(name: str) -> ModelConfig:
    if name not in NAMED_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(NAMED_MODELS)}")
    return NAMED_MODELS[name]


def transformer_config(
    model: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline: int = 1,
    pipeline_layout=None,
    context_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = False,
    recompute: bool = False,
    recompute_modules: tuple = (),
) -> TransformerConfig:
    """Megatron's TransformerConfig for `model` under the given parallel layout and precision.
    pipeline_layout: megatron's per-chunk layer layout for uneven pipeline splits (None: even).
    recompute: full recompute, one layer at a time; else recompute_modules (of RECOMPUTE_MODULES): selective."""
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads,
        kv_channels=model.attention_head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # megatron's fused SwiGLU (torch.compile) where the model lives on a GPU; plain ops on CPU.
        bias_activation_fusion=not use_cpu_initialization and torch.cuda.is_available(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        init_method_std=model.init_std,
        linear_conv_kernel_dim=model.conv_kernel,
        linear_key_head_dim=model.key_head_dim,
        linear_value_head_dim=model.value_head_dim,
        linear_num_key_heads=model.num_heads,
        linear_num_value_heads=model.num_heads,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
        pipeline_model_parallel_layout=pipeline_layout,
        pipeline_dtype=params_dtype,
        # The interleaved schedule exchanges activations and gradients in separate calls (megatron-LM's own setting
        # for it). Batched, its steady state sends a stage's activation and its input gradient to one neighbour in
        # one batch_isend_irecv; at pipeline size 2 that neighbour is both the next and the previous stage, the
        # untagged ops pair by posting order, and the activation lands in the peer's gradient buffer and vice versa.
        overlap_p2p_comm=virtual_pipeline > 1,
        batch_p2p_comm=virtual_pipeline == 1,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        # Checkpoint each layer under its own key (layers.N.*), as hybrid models need: their layers differ.
        hetereogenous_dist_checkpoint=True,
        recompute_granularity="full" if recompute else "selective" if recompute_modules else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        recompute_modules=list(recompute_modules),
        cuda_graph_scope=[],  # megatron's own default, "full", warns that it is deprecated
    )
