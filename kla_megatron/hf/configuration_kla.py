"""The Hugging Face configuration of an exported KLA / GDN / hybrid / transformer language model.

Shipped as is in every exported folder (it imports only transformers); `kla_megatron.export_hf` fills it from the
training run's `ModelConfig`.
"""

from transformers import PretrainedConfig

MIXERS = ("kla", "gdn", "attention")


class KLAConfig(PretrainedConfig):
    model_type = "kla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1536,
        intermediate_size: int = 6144,
        num_heads: int = 12,
        key_head_dim: int = 96,
        value_head_dim: int = 192,
        attention_head_dim: int = 128,
        layer_mixers: tuple = ("kla",) * 11,
        conv_kernel: int = 4,
        kla_eps: float = 1e-6,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        kernel_backend: str = "auto",
        decode_cuda_graphs: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 3,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        """layer_mixers: each layer's token mixer, "kla" (Kaczmarz step on raw keys), "gdn" (Gated DeltaNet) or
        "attention" (softmax attention with RoPE; num_heads heads of attention_head_dim). kernel_backend: "auto"
        (Triton kernels on CUDA tensors when Triton is installed, PyTorch otherwise) or "torch". decode_cuda_graphs:
        on a GPU, one-token steps of a model without attention layers replay CUDA graphs."""
        unknown = sorted(set(layer_mixers) - set(MIXERS))
        if unknown:
            raise ValueError(f"layer_mixers holds {unknown}; each layer is one of {MIXERS}")
        if kernel_backend not in ("auto", "torch"):
            raise ValueError(f"kernel_backend must be 'auto' or 'torch', got {kernel_backend!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.key_head_dim = key_head_dim
        self.value_head_dim = value_head_dim
        self.attention_head_dim = attention_head_dim
        self.layer_mixers = list(layer_mixers)
        self.num_hidden_layers = len(self.layer_mixers)
        self.conv_kernel = conv_kernel
        self.kla_eps = kla_eps
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.kernel_backend = kernel_backend
        self.decode_cuda_graphs = decode_cuda_graphs
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.pop("num_hidden_layers", None)  # derived from layer_mixers (config.json carries both)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
