"""KLA, GDN, hybrid and transformer language models for Hugging Face transformers (`trust_remote_code=True`).

The same network as the megatron model of kla_megatron (model.py, specs.py): word embeddings, pre-norm layers
(RMSNorm, token mixer, residual; RMSNorm, SwiGLU MLP, residual), a final RMSNorm and the output projection. A layer's
mixer is KLA or GDN (`kla_megatron.mixer_math.mix` between the input and output projections, the function the
megatron mixer calls) or softmax attention with RoPE (megatron's rotate-half form, base `rope_theta`). The export
(kla_megatron/export_hf.py) ships this file beside copies of mixer_math and the kernels it imports, flattened into
one folder, so it runs where only torch and transformers are installed; Triton kernels run on CUDA tensors when
Triton is installed.

Generation keeps a `KLACache`: per KLA/GDN layer the conv's last inputs and the recurrent state (a fixed size, so a
new token costs the same at any context length), per attention layer the keys and values so far. Padding (0 in
`attention_mask`, e.g. left padding of a batch) enters neither a recurrent state nor an attention. On a GPU, the
one-token steps of a model without attention layers replay CUDA graphs (`DecodeGraphs`; config
`decode_cuda_graphs`).
"""

import importlib.util
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from kernels import rms_norm
from kla_megatron.mixer_math import MixerShape, MixerState, mix

from .configuration_kla import KLAConfig

BETA_MODES = {"kla": "kaczmarz", "gdn": "sigmoid"}
# Attention over a cache whose length grows every call (decoding, chunked prefill). Recent torch puts cuDNN first on
# Hopper and Blackwell, and cuDNN builds (milliseconds of host time) and caches a graph for every new key length,
# which a decode step always is; these backends have no per-shape set-up.
GROWING_KEYS_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def kernel_backend(config: KLAConfig) -> str:
    """The kernels' backend: Triton on CUDA tensors when it is installed ("auto"), PyTorch otherwise."""
    if config.kernel_backend == "auto" and importlib.util.find_spec("triton") is not None:
        return "auto"
    return "torch"


class KeyValues:
    """An attention layer's keys and values so far, [N, heads, tokens, head_dim], in buffers that double when full,
    so appending a token costs O(1) amortised instead of a copy of the whole cache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values
        self.length = keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        """Adds [N, heads, new, head_dim]; returns all keys and values so far (views)."""
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            capacity = max(end, 2 * self.keys.shape[2])
            self.keys = self._grown(self.keys, capacity)
            self.values = self._grown(self.values, capacity)
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grown(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        N, H, _, D = buffer.shape
        grown = buffer.new_empty(N, H, capacity, D)
        grown[:, :, :self.length] = buffer[:, :, :self.length]
        return grown

    def select(self, rows: torch.Tensor) -> "KeyValues":
        return KeyValues(self.keys[:, :, :self.length].index_select(0, rows),
                         self.values[:, :, :self.length].index_select(0, rows))


class KLACache:
    """`past_key_values` of these models: each layer's `MixerState` (KLA / GDN: conv inputs [N, channels, W-1] and
    recurrent state [N, H, K, V] fp32) or `KeyValues` (attention), and how many tokens (padding included) it has
    seen. forward() creates it when use_cache is set and continues it when it is passed back."""

    def __init__(self, num_layers: int):
        self.layers = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row n continues from row beam_idx[n]."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MixerState):
                rows = beam_idx.to(layer.recurrent.device)
                self.layers[i] = MixerState(layer.conv.index_select(0, rows), layer.recurrent.index_select(0, rows))
            elif isinstance(layer, KeyValues):
                self.layers[i] = layer.select(beam_idx.to(layer.keys.device))


class StepGraph:
    """One CUDA graph of a one-token step at one batch size, over static buffers: the token ids, the new tokens'
    padding mask and every layer's conv and recurrent state, which the step updates in place. The cache stepping
    through the graph holds those buffers as its states; when another cache comes, the one before gets copies of
    its states back and the newcomer's states are copied in."""

    def __init__(self, model: "KLAForCausalLM", cache: "KLACache"):
        self.states = [MixerState(s.conv.clone(), s.recurrent.clone()) for s in cache.layers]
        N, device = cache.layers[0].conv.shape[0], cache.layers[0].conv.device
        self.ids = torch.zeros(N, 1, dtype=torch.long, device=device)
        self.mask = torch.ones(N, 1, dtype=torch.long, device=device)
        self.owner = None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # the first launches compile the Triton kernels; the warm-up's states are dropped
            for _ in range(2):
                self._step(model)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step(model)

    def _step(self, model: "KLAForCausalLM") -> torch.Tensor:
        cache = KLACache(len(self.states))
        cache.layers = list(self.states)
        hidden = model.model(input_ids=self.ids, attention_mask=self.mask, cache=cache).last_hidden_state
        for buffer, new in zip(self.states, cache.layers):
            buffer.conv.copy_(new.conv)
            buffer.recurrent.copy_(new.recurrent)
        return model.lm_head(hidden)

    def run(self, input_ids: torch.Tensor, token_mask: Optional[torch.Tensor], cache: "KLACache") -> torch.Tensor:
        owner = self.owner() if self.owner is not None else None
        if owner is not cache or any(layer is not buffer for layer, buffer in zip(cache.layers, self.states)):
            if owner is not None and owner is not cache:
                owner.layers = [MixerState(layer.conv.clone(), layer.recurrent.clone()) if layer is buffer else layer
                                for layer, buffer in zip(owner.layers, self.states)]
            for buffer, state in zip(self.states, cache.layers):
                if state is not buffer:
                    buffer.conv.copy_(state.conv)
                    buffer.recurrent.copy_(state.recurrent)
            cache.layers = list(self.states)
            self.owner = weakref.ref(cache)
        self.ids.copy_(input_ids)
        if token_mask is None:
            self.mask.fill_(1)
        else:
            self.mask.copy_(token_mask)
        self.graph.replay()
        cache.seen_tokens += 1
        return self.logits.clone()


class DecodeGraphs:
    """One-token decoding steps of a model whose layers are all KLA / GDN, replayed as CUDA graphs: at small
    batches a step's ~30 kernel launches a layer take far longer to issue than to run. A `StepGraph` is captured
    at the first step of each batch size, device and set of weights (moved or cast weights get a new one)."""

    def __init__(self):
        self.graphs = {}

    def step(self, model: "KLAForCausalLM", input_ids, token_mask, cache: "KLACache") -> torch.Tensor:
        key = (input_ids.shape[0], input_ids.device, tuple(p.data_ptr() for p in model.parameters()))
        if key not in self.graphs:
            self.graphs[key] = StepGraph(model, cache)
        return self.graphs[key].run(input_ids, token_mask, cache)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)


class MLP(nn.Module):
    def __init__(self, config: KLAConfig):
        super().__init__()
        # megatron's linear_fc1: rows [SiLU half | linear half]
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class KLAMixer(nn.Module):
    """KLA (beta_mode "kaczmarz") or GDN ("sigmoid"): in_proj, `mix`, out_proj, as kla_megatron's KLAMixer."""

    def __init__(self, config: KLAConfig, beta_mode: str, backend: str):
        super().__init__()
        self.shape = MixerShape(config.num_heads, config.key_head_dim, config.value_head_dim, beta_mode,
                                config.kla_eps, config.rms_norm_eps)
        H, V = config.num_heads, config.value_head_dim
        self.in_proj = nn.Linear(config.hidden_size, sum(self.shape.projection_split), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.shape.conv_channels, config.conv_kernel))
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(H, V))
        self.out_proj = nn.Linear(H * V, config.hidden_size, bias=False)
        self.backend = backend

    def forward(self, x, cache: Optional[KLACache], layer_idx: int, token_mask, **unused):
        state = None if cache is None else cache.layers[layer_idx]
        y, new_state = mix(self.in_proj(x), self.conv_weight, self.A_log, self.dt_bias, self.norm_weight, self.shape,
                           state=state, output_state=cache is not None, token_mask=token_mask, backend=self.backend)
        if cache is not None:
            cache.layers[layer_idx] = new_state
        return self.out_proj(y)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin [B, T, head_dim] of RoPE as megatron computes them: angles in fp32, rounded to the inputs' dtype."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (base ** exponents)
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    """Causal softmax attention with RoPE. qkv_proj is megatron's linear_qkv: per head, [query | key | value]."""

    def __init__(self, config: KLAConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.attention_head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * self.heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cache: Optional[KLACache], layer_idx: int, rotary, attention_bias, **unused):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, self.heads, 3, self.head_dim).unbind(dim=3)
        cos, sin = (t[:, :, None] for t in rotary)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]
        if cache is not None:
            if cache.layers[layer_idx] is None:
                cache.layers[layer_idx] = KeyValues(k.contiguous(), v.contiguous())
            else:
                k, v = cache.layers[layer_idx].append(k, v)
        if k.shape[2] == T:  # no cache before this call: one shape for the whole prompt
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias,
                                                 is_causal=attention_bias is None and T > 1)
        else:
            with sdpa_kernel(GROWING_KEYS_BACKENDS):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


def attention_bias(attention_mask: Optional[torch.Tensor], past: int, T: int, device) -> Optional[torch.Tensor]:
    """Boolean [B, 1, T, past + T] (None where is_causal says it all): query i, at position past + i, sees key j
    when j <= past + i and key j is not padding. A query always sees itself, so a padding query's output is finite
    (it feeds only later padding positions, which no real token reads)."""
    if attention_mask is None and (past == 0 or T == 1):
        return None
    queries = torch.arange(past, past + T, device=device)[:, None]
    keys = torch.arange(past + T, device=device)[None, :]
    allowed = keys <= queries
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, None, :].bool()) | (keys == queries)
    return allowed if allowed.dim() == 4 else allowed[None, None]


class KLADecoderLayer(nn.Module):
    def __init__(self, config: KLAConfig, mixer: str, backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        if mixer == "attention":
            self.mixer = Attention(config)
        else:
            self.mixer = KLAMixer(config, BETA_MODES[mixer], backend)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.mlp = MLP(config)

    def forward(self, x, **mixer_inputs):
        x = x + self.mixer(self.input_layernorm(x), **mixer_inputs)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class KLAPreTrainedModel(PreTrainedModel):
    config_class = KLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["KLADecoderLayer"]
    # The model brings its own cache (KLACache): generate() must not build a KV cache for it.
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False


class KLAModel(KLAPreTrainedModel):
    def __init__(self, config: KLAConfig):
        super().__init__(config)
        backend = kernel_backend(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(KLADecoderLayer(config, mixer, backend) for mixer in config.layer_mixers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[KLACache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[KLACache] = None,
        **unused,
    ):
        """attention_mask [B, past + T] (1 token, 0 padding) covers the cached tokens and the new ones;
        position_ids [B, T] (RoPE only) default to past + 0..T-1. transformers 5 passes the cache as `cache`,
        4.x as `past_key_values`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = past_key_values if past_key_values is not None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if cache is None and use_cache:
            cache = KLACache(len(self.layers))
        past = 0 if cache is None else cache.seen_tokens
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [batch, cached + new tokens] = {(B, past + T)}, got "
                             f"{tuple(attention_mask.shape)}")
        mixer_inputs = dict(cache=cache, token_mask=None if attention_mask is None else attention_mask[:, past:])
        if "attention" in self.config.layer_mixers:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            mixer_inputs["rotary"] = rotary_cos_sin(position_ids, self.config.attention_head_dim,
                                                    self.config.rope_theta, x.dtype)
            mixer_inputs["attention_bias"] = attention_bias(attention_mask, past, T, x.device)
        hidden_states = ()
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states += (x,)
            x = layer(x, layer_idx=i, **mixer_inputs)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states += (x,)
        if cache is not None:
            cache.seen_tokens += T
        # Positional: transformers 5 names the cache field `cache`, 4.x `past_key_values`.
        out = BaseModelOutputWithPast(x, cache, hidden_states if output_hidden_states else None)
        return out.to_tuple() if return_dict is False else out


class KLAForCausalLM(KLAPreTrainedModel, GenerationMixin):
    def __init__(self, config: KLAConfig):
        super().__init__(config)
        self.model = KLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decode_graphs = DecodeGraphs()
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _graphed_step(self, input_ids, attention_mask, cache, labels, output_hidden_states) -> bool:
        """Whether this call is a one-token step that `decode_graphs` replays: no attention layers, a CUDA model
        continuing a cache, logits only (no loss, no hidden states), no gradients, not already inside a capture."""
        hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return (self.config.decode_cuda_graphs and "attention" not in self.config.layer_mixers
                and input_ids is not None and input_ids.is_cuda and input_ids.shape[1] == 1
                and isinstance(cache, KLACache) and cache.seen_tokens > 0
                and (attention_mask is None or tuple(attention_mask.shape) == (input_ids.shape[0], cache.seen_tokens + 1))
                and labels is None and not hidden_states
                and not torch.is_grad_enabled() and not torch.cuda.is_current_stream_capturing())

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[KLACache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        cache: Optional[KLACache] = None,
        **unused,
    ):
        """labels [B, T]: next-token loss (-100 ignored). logits_to_keep: logits of the last N positions only
        (generate asks for 1), 0 for all."""
        cache = past_key_values if past_key_values is not None else cache
        if self._graphed_step(input_ids, attention_mask, cache, labels, output_hidden_states):
            logits = self.decode_graphs.step(self, input_ids, None if attention_mask is None else attention_mask[:, -1:],
                                             cache)
            out = CausalLMOutputWithPast(None, logits, cache, None)
            return out.to_tuple() if return_dict is False else out
        if cache is None and (self.config.use_cache if use_cache is None else use_cache):
            cache = KLACache(len(self.model.layers))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=cache is not None, output_hidden_states=output_hidden_states,
                         cache=cache)
        logits = self.lm_head(out.last_hidden_state[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        # Positional: transformers 5 names the cache field `cache`, 4.x `past_key_values`.
        out = CausalLMOutputWithPast(loss, logits, cache, out.hidden_states)
        return out.to_tuple() if return_dict is False else out
