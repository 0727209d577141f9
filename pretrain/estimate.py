"""Memory and step time per GPU for a training config and parallel layout, before any GPU is used.

    python -m pretrain.estimate --config configs/kla_1.3b.toml [--gpus 16] [--vocab-size 32000] [key=value ...]

Prints, for the GPU that holds the most (the first pipeline stage, or the last when the logits weigh
more), what training keeps in GPU memory, with and without full activation recompute, whether it fits
80 GB and 141 GB GPUs, and the step time expected from a measured throughput (bench/results/*.json).
`python -m pretrain` runs the same estimate before it allocates anything and refuses a layout that
cannot fit its GPU unless `parallel.force_layout=true`.

What is counted (bytes; P = parameters on this GPU, D = ZeRO's sharding degree = data x context
parallel ranks, e = 2 in bf16 runs and 4 in fp32 runs):

  parameters     e P (the bf16 weights megatron computes with)
  gradients      g P with ZeRO-1, g P / D with ZeRO-2, where g is DeepSpeed's gradient-accumulation
                 dtype (data_types.grad_accum_dtype; by default the model's dtype, so bf16 in bf16 runs)
  reduce bucket  zero_optimization.reduce_bucket_size elements of g (DeepSpeed's default 5e8: 1 GB in
                 bf16), allocated at the first gradient of a step and held until its last micro-batch
  optimizer      4 P / D fp32 master weights + 8 P / D Adam moments (two fp32 states)
  step           the optimizer step flattens this rank's gradient partition (g P / D) and converts it to
                 fp32 (4 P / D); activations are gone by then, so the step peak is
                 parameters + gradients + optimizer + this

  activations    per layer and token, what autograd keeps for the backward (below), times the tokens of
                 one micro-batch on this GPU (micro_batch_size x seq_length / context), times the layers
                 of this pipeline stage, times the micro-batches in flight (1 without pipelining; with
                 1F1B, min(pipeline - stage, micro-batches)). Full recompute keeps only each layer's input
                 (e h' per token) and rebuilds one layer at a time in the backward.
  logits         last stage: the bf16 logits and their fp32 copy, which the cross entropy turns into the
                 softmax in place and keeps ((e + 4) per logit; 4 in fp32 runs), V' = padded vocab / TP
  backward       the working set of the first layers the backward reaches: the logit gradient cast
                 (e V' per token) next to the reduce bucket, then one layer's gradient temporaries

  peak = parameters + gradients + optimizer
         + max(activations + final norm + max(logits, e V' + bucket) + one layer's backward temporaries,
               step)

Per layer and token, on one tensor-parallel rank (h' = hidden / TP with sequence parallelism, else
hidden; H' = heads / TP; K, V = key and value head dims; F' = ffn / TP; W = conv width; C' = H'(2K + V)
conv channels; s = this rank's sequence length):

  every layer      two RMSNorms: an fp32 copy of the input and the fp32 normalised output (8 h' + 4)
                   and the output the next linear keeps (e h' each); MLP: fc1 output (2 e F'), silu of
                   its gate half (e F'), the linear half plus megatron's glu offset (e F'), fc2 input (e F')
  KLA / GDN mixer  in_proj output, which the conv's first tap keeps whole (e H'(2K + 2V + 2)); the W - 1
                   shifted copies of the conv input (e C' (W - 1), plus W(W-1)/2 padding rows a sequence);
                   the conv output the silu keeps (e C'); the contiguous q, k, v the kernel keeps (e C');
                   nine fp32 per-head gate scalars (a + dt_bias, softplus, g, sigmoid(b), the kernel's g,
                   eta, its gate cumsum and inverse key and query norms: 36 H'); the chunk inverse
                   (e 64 H'); with model.kernel_keep_states also w, the new values and the per-chunk
                   states (e H'(K + V + K V / 64)); the fp32 copy of z (4 H'V, bf16 runs only); the
                   per-head RMSNorm (8 H'V + 4 H' and e H'V output), silu(z) (e H'V), out_proj input (e H'V)
  attention        qkv output, kept by the probabilities-times-values product (3 e H'd); q and k after
                   RoPE (2 e H'd) and the cos and sin it multiplies them by (4 e d a position); the fp32 softmax output and its bf16 copy (4 H's + e H's; 4 H's in fp32
                   runs); the output projection input (e H'd); and megatron's score buffer e b H' s^2,
                   allocated once
  pipeline         stages after the first keep each in-flight micro-batch's input and output (2 e h')

What is not modelled: the PyTorch chunkwise kernel backend (CPU runs) keeps more; context-parallel
state summaries are assumed kept for the backward (all ranks' M, N: context x H'K(K + V) x 4 bytes a
sequence and layer); the CUDA context, NCCL buffers and allocator fragmentation are outside
torch.cuda.max_memory_allocated, which is what this estimates, so a layout is refused above
`usable_bytes(total)` of the GPU, not above its total.
"""

import argparse
import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

GIB = 2**30
CHUNK = 64  # the chunk length of kernels/kla (its per-chunk states and chunk inverse are per 64 tokens)
PAPER_VOCAB = 32000
GPU_SIZES = {"80 GB": 81559 * 2**20, "141 GB": 143771 * 2**20}  # total_memory of an H100 80GB / H200
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def usable_bytes(total_memory: int) -> int:
    """What torch may allocate on a GPU of `total_memory` bytes: the CUDA context, NCCL's buffers and
    the caching allocator's fragmentation take the rest (about 3 GiB, or 5%, whichever is more)."""
    return total_memory - max(3 * GIB, total_memory // 20)


@dataclass(frozen=True)
class Layout:
    """How one training step is spread over the GPUs."""

    world_size: int
    tensor: int
    pipeline: int
    context: int
    sequence_parallel: bool
    zero_stage: int
    micro_batch_size: int
    seq_length: int
    global_batch_size: int
    recompute: bool
    bf16: bool

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline * self.context)

    @property
    def zero_shards(self) -> int:
        """ZeRO shards over megatron's data x context group."""
        return self.data * self.context

    @property
    def num_microbatches(self) -> int:
        return max(1, self.global_batch_size // (self.micro_batch_size * self.data))

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one GPU."""
        return self.micro_batch_size * self.seq_length // self.context

    @staticmethod
    def of(config, world_size: int, bf16: Optional[bool] = None) -> "Layout":
        p, t = config.parallel, config.training
        if bf16 is None:
            bf16 = t.precision != "fp32"  # auto means bf16 on the GPUs this estimates
        return Layout(world_size, p.tensor, p.pipeline, p.context, p.sequence_parallel, p.zero_stage,
                      t.micro_batch_size, config.data.seq_length, t.global_batch_size, t.recompute, bf16)

    def describe(self) -> str:
        return (f"{self.world_size} GPU(s): TP {self.tensor} PP {self.pipeline} CP {self.context} DP {self.data}"
                f"{' SP' if self.sequence_parallel else ''}, ZeRO-{self.zero_stage}, {'bf16' if self.bf16 else 'fp32'}")


# -- per-token activations -----------------------------------------------------------------------------

def layer_terms(model, mixer: str, layout: Layout) -> dict:
    """Bytes that one layer keeps for its backward, per token of this GPU's micro-batch, by what keeps them."""
    e = 2 if layout.bf16 else 4
    tp = layout.tensor
    h = model.hidden_size // tp if layout.sequence_parallel else model.hidden_size
    ffn = model.ffn_hidden_size // tp
    heads = model.num_heads // tp
    s = layout.seq_length // layout.context
    terms = {
        "norms (fp32 input copy + normalised, x2)": 2 * (8 * h + 4),
        "norm outputs kept by in_proj/qkv and fc1": 2 * e * h,
        "MLP: fc1 output, silu(gate), linear half, fc2 input": e * 5 * ffn,
    }
    if mixer == "attention":
        d = model.attention_head_dim
        terms.update({
            "attention: qkv output (kept by probs @ v)": 3 * e * heads * d,
            "attention: q, k after RoPE": 2 * e * heads * d,
            "attention: RoPE cos and sin for q and k (per position)": 4 * e * d / layout.micro_batch_size,
            "attention: softmax (fp32) and its bf16 copy": (4 + (e if e != 4 else 0)) * heads * s,
            "attention: output projection input": e * heads * d,
        })
        return terms
    K, V, W = model.key_head_dim, model.value_head_dim, model.conv_kernel
    conv_channels = heads * (2 * K + V)
    terms.update({
        "mixer: in_proj output (kept whole by the conv)": e * heads * (2 * K + 2 * V + 2),
        "mixer: conv shifted inputs": e * conv_channels * (W - 1) * (1 + W / (2 * s)),
        "mixer: conv output (silu input)": e * conv_channels,
        "mixer: q, k, v (kernel input)": e * conv_channels,
        "mixer: gate scalars and per-token factors (fp32)": 36 * heads,
        "mixer: chunk inverse": e * CHUNK * heads,
        "mixer: z in fp32": 4 * heads * V if e != 4 else 0,
        "mixer: per-head RMSNorm": 8 * heads * V + 4 * heads + e * heads * V,
        "mixer: silu(z) and out_proj input": 2 * e * heads * V,
    })
    if model.kernel_keep_states:
        terms["mixer: kept states w, new values, per-chunk h"] = e * heads * (K + V + K * V / CHUNK)
    if layout.context > 1:
        # Context parallelism: every rank's span summary (M: K x K, N: K x V, fp32) for each sequence.
        terms["mixer: context-parallel summaries"] = layout.context * heads * K * (K + V) * 4 / s
    return terms


def backward_temporaries(model, mixer: str, layout: Layout) -> float:
    """Bytes per token that one layer's backward allocates on top of what the forward kept: the gradients
    of the kernel's inputs and intermediates (KLA/GDN), or of the attention probabilities."""
    e = 2 if layout.bf16 else 4
    heads = model.num_heads // layout.tensor
    if mixer == "attention":
        return (2 * e + 4) * heads * layout.seq_length // layout.context
    K, V = model.key_head_dim, model.value_head_dim
    # dq, dk, dv; dk in fp32; dw; dh per chunk; d(new values); the local dv
    grads = e * heads * (2 * K + V) + 4 * heads * K + e * heads * K + e * heads * K * V / CHUNK + 2 * e * heads * V
    if not model.kernel_keep_states:  # w, u, h and the new values are recomputed first
        grads += e * heads * (K + 2 * V + K * V / CHUNK)
    return grads


# -- parameters --------------------------------------------------------------------------------------

def layer_parameters(model, mixer: str, tensor: int) -> int:
    """Parameters of one layer on one tensor-parallel rank (norms are replicated)."""
    d, heads = model.hidden_size, model.num_heads
    mlp = 3 * d * model.ffn_hidden_size // tensor
    norms = 2 * d
    if mixer == "attention":
        width = heads * model.attention_head_dim
        return 4 * d * width // tensor + mlp + norms
    K, V = model.key_head_dim, model.value_head_dim
    in_proj = d * heads * (2 * K + 2 * V + 2)
    out_proj = heads * V * d
    conv = heads * (2 * K + V) * model.conv_kernel
    per_head = heads * (2 + V)  # A_log, dt_bias, the per-head norm weight
    return (in_proj + out_proj + conv + per_head) // tensor + mlp + norms


def stage_layers(model, pipeline: int, stage: int) -> list:
    per_stage = model.num_layers // pipeline
    return [model.layer_mixer(i) for i in range(stage * per_stage + 1, (stage + 1) * per_stage + 1)]


def stage_parameters(model, vocab_rows: int, tensor: int, pipeline: int, stage: int) -> int:
    count = sum(layer_parameters(model, mixer, tensor) for mixer in stage_layers(model, pipeline, stage))
    embedding = vocab_rows * model.hidden_size // tensor
    if stage == 0:
        count += embedding
    if stage == pipeline - 1:
        count += model.hidden_size  # final norm
        if not (model.tie_embeddings and pipeline == 1):
            count += embedding  # output layer
    return count


# -- the estimate ------------------------------------------------------------------------------------

@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    stage: int
    parameters: int
    layers: list
    in_flight: int
    weights: float = 0
    gradients: float = 0
    reduce_bucket: float = 0
    optimizer: float = 0
    step: float = 0
    activations: float = 0
    final: float = 0
    logits: float = 0
    logits_grad: float = 0
    backward: float = 0
    buffers: float = 0

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def training(self) -> float:
        """Everything at the start of the backward, the peak of a step's forward and backward."""
        logits = max(self.logits, self.logits_grad + self.reduce_bucket) if self.logits else self.reduce_bucket
        return self.static + self.activations + self.final + logits + self.backward + self.buffers

    @property
    def peak(self) -> float:
        return max(self.training, self.static + self.step)


@dataclass
class Estimate:
    model: object
    layout: Layout
    vocab_size: int
    vocab_rows: int
    total_parameters: int
    stages: list  # StageMemory, one per pipeline stage
    terms: dict = field(default_factory=dict)  # per-layer activation terms of the worst stage's first layer kind

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def peak(self) -> float:
        return self.worst.peak


def _zero_settings(config, layout: Layout) -> tuple:
    """(gradient bytes, reduce bucket bytes) from the DeepSpeed config the trainer builds."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pretrain.zero import deepspeed_config

    ds = deepspeed_config(config, layout.bf16, layout.zero_shards)
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    grad_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}.get(accum, 2 if layout.bf16 else 4)
    buffers = 2 if zero.overlap_comm else 1
    return grad_bytes, zero.reduce_bucket_size * grad_bytes * buffers if zero.contiguous_gradients else 0


def estimate(config, world_size: int, vocab_size: int, bf16: Optional[bool] = None, recompute: Optional[bool] = None) -> Estimate:
    """The memory of every pipeline stage's GPU for `config` on `world_size` GPUs."""
    from kla_megatron.model import padded_vocab_size

    model = config.model.resolve()
    if recompute is not None:
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, recompute=recompute))
    layout = Layout.of(config, world_size, bf16)
    e = 2 if layout.bf16 else 4
    vocab_rows = padded_vocab_size(vocab_size, layout.tensor)
    grad_bytes, bucket = _zero_settings(config, layout)
    t = layout.tokens
    h = model.hidden_size // layout.tensor if layout.sequence_parallel else model.hidden_size
    stages = []
    for stage in range(layout.pipeline):
        P = stage_parameters(model, vocab_rows, layout.tensor, layout.pipeline, stage)
        layers = stage_layers(model, layout.pipeline, stage)
        in_flight = min(layout.pipeline - stage, layout.num_microbatches) if layout.pipeline > 1 else 1
        m = StageMemory(stage, P, layers, in_flight)
        m.weights = e * P
        m.gradients = grad_bytes * P / (layout.zero_shards if layout.zero_stage == 2 else 1)
        m.reduce_bucket = bucket
        m.optimizer = 12 * P / layout.zero_shards
        m.step = (grad_bytes + (4 if grad_bytes != 4 else 0)) * P / layout.zero_shards
        per_layer = [sum(layer_terms(model, mixer, layout).values()) for mixer in layers]
        if layout.recompute:
            kept = len(layers) * e * h * t * in_flight + max(per_layer) * t
        else:
            kept = sum(per_layer) * t * in_flight
        if stage > 0:
            kept += 2 * e * h * t * in_flight  # the schedule's received input and sent output
        if stage == 0:
            kept += 8 * t * in_flight  # token ids kept by the embedding
        m.activations = kept
        m.backward = max(backward_temporaries(model, mixer, layout) for mixer in layers) * t
        if stage == layout.pipeline - 1:
            logit_bytes = e + 4 if e != 4 else 4
            m.final = (8 * h + 4 + e * h) * t + 9 * t  # final norm, output-layer input, targets
            m.logits = logit_bytes * vocab_rows // layout.tensor * t
            m.logits_grad = e * vocab_rows // layout.tensor * t if e != 4 else 0
        # megatron's global buffer: the all-gathered input of sequence-parallel linears, or the
        # attention score buffer (one, the larger, reused by every layer)
        gathered = e * model.hidden_size * layout.micro_batch_size * layout.seq_length if layout.sequence_parallel else 0
        scores = max((e * layout.micro_batch_size * model.num_heads // layout.tensor * (layout.seq_length // layout.context) ** 2
                      for mixer in layers if mixer == "attention"), default=0)
        m.buffers = max(gathered, scores)
        stages.append(m)
    worst = max(stages, key=lambda s: s.peak)
    return Estimate(model, layout, vocab_size, vocab_rows, stage_parameters(model, vocab_rows, 1, 1, 0), stages,
                    layer_terms(model, worst.layers[0], layout))


def check_fits(config, world_size: int, vocab_size: int, total_memory: int, device_name: str = "this GPU") -> Estimate:
    """The estimate, or a ConfigError naming the overflow and the settings that would shrink it."""
    from pretrain.config import ConfigError

    result = estimate(config, world_size, vocab_size)
    limit = usable_bytes(total_memory)
    if result.peak <= limit:
        return result
    worst = result.worst
    hints = []
    if not result.layout.recompute:
        with_recompute = estimate(config, world_size, vocab_size, recompute=True).peak
        if with_recompute <= limit:
            hints.append(f"training.recompute=true ({with_recompute / GIB:.1f} GiB)")
    if result.layout.micro_batch_size > 1:
        hints.append("a smaller training.micro_batch_size")
    if result.layout.zero_stage == 1 and result.layout.pipeline == 1 and result.layout.zero_shards > 1:
        hints.append("parallel.zero_stage=2")
    hints.append("more parallel.tensor or parallel.pipeline")
    raise ConfigError(
        f"this layout needs about {result.peak / GIB:.1f} GiB per GPU (pipeline stage {worst.stage}: "
        f"{worst.static / GIB:.1f} GiB weights, gradients and optimizer, {worst.activations / GIB:.1f} GiB activations) "
        f"but {device_name} has {total_memory / GIB:.1f} GiB ({limit / GIB:.1f} GiB usable); try "
        f"{', '.join(hints)}, see `python -m pretrain.estimate`, or set parallel.force_layout=true to start anyway"
    )


# -- step time from measurements ----------------------------------------------------------------------

def _measured_runs() -> list:
    """Rows of bench/results/*.json that recorded training throughput: bench/pretrain.py writes one
    run per file, bench/estimate_check.py a list under "runs"."""
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for row in data.get("runs", [data]) if isinstance(data, dict) else []:
            if isinstance(row, dict) and "tokens_per_s" in row and "config" in row:
                rows.append(dict(row, source=str(path.relative_to(RESULTS.parents[1]))))
    return rows


def _same_work_per_gpu(run: dict, config, layout: Layout) -> bool:
    """Whether a measured run did the same work per GPU: same model, sequence, micro-batch, recompute,
    kernels and model-parallel layout (data parallelism only repeats it)."""
    c = run["config"]
    mine = config.to_dict()
    parallel = c.get("parallel", {})
    return (
        c["model"] == mine["model"]
        and c["data"]["seq_length"] == layout.seq_length
        and c["training"]["micro_batch_size"] == layout.micro_batch_size
        and c["training"].get("recompute", False) == layout.recompute
        and all(parallel.get(k, 1) == v for k, v in (("tensor", layout.tensor), ("pipeline", layout.pipeline), ("context", layout.context)))
        and parallel.get("sequence_parallel", False) == layout.sequence_parallel
    )


def measured_throughput(config, layout: Layout) -> Optional[dict]:
    """The newest measured run of the same per-GPU work, or None."""
    runs = [r for r in _measured_runs() if _same_work_per_gpu(r, config, layout)]
    return max(runs, key=lambda r: r.get("date", "")) if runs else None


# -- command line ------------------------------------------------------------------------------------

def vocab_size_of(config) -> Optional[int]:
    """The vocabulary of the config's tokenizer, when the config names one that exists here."""
    tokenizer = config.data.tokenizer
    if not tokenizer and config.data.manifest and Path(config.data.manifest).is_file():
        tokenizer = json.loads(Path(config.data.manifest).read_text()).get("tokenizer_model")
    if not tokenizer or not Path(tokenizer).exists():
        return None
    from pretrain.data import load_tokenizer

    return load_tokenizer(tokenizer).vocab_size


def report(config, world_size: int, vocab_size: int, vocab_note: str) -> str:
    plain = estimate(config, world_size, vocab_size, recompute=False)
    recomputed = estimate(config, world_size, vocab_size, recompute=True)
    layout, model = plain.layout, plain.model
    a, b = plain.worst, recomputed.worst
    total = plain.total_parameters
    rows = [
        (f"parameters ({a.parameters / 1e6:,.0f}M on this GPU)", a.weights, b.weights),
        (f"gradients (ZeRO-{layout.zero_stage})", a.gradients, b.gradients),
        (f"optimizer (fp32 master + Adam, sharded {layout.zero_shards} ways)", a.optimizer, b.optimizer),
        ("ZeRO reduce bucket", a.reduce_bucket, b.reduce_bucket),
        (f"activations ({len(a.layers)} layers x {a.in_flight} micro-batch in flight)", a.activations, b.activations),
        ("logits and final norm", a.logits + a.final, b.logits + b.final),
        ("backward temporaries, buffers", a.backward + a.buffers, b.backward + b.buffers),
        ("peak (torch.cuda.max_memory_allocated)", a.peak, b.peak),
    ]
    lines = [
        f"{config.model.name} ({model.mixer}, {model.num_layers} layers, hidden {model.hidden_size}; vocab {vocab_size} "
        f"({vocab_note}) -> {plain.vocab_rows} rows) | {layout.describe()}",
        f"micro-batch {layout.micro_batch_size} x {layout.seq_length} tokens, {layout.num_microbatches} micro-batch(es) a step, "
        f"{layout.global_batch_size * layout.seq_length:,} tokens a step | {total / 1e9:.2f}B parameters",
        "",
        f"{f'GiB per GPU (pipeline stage {a.stage} of {layout.pipeline})':<56}{'no recompute':>14}{'full recompute':>16}",
    ]
    lines += [f"  {label:<54}{x / GIB:>14.2f}{y / GIB:>16.2f}" for label, x, y in rows]
    for name, size in GPU_SIZES.items():
        usable = usable_bytes(size)
        verdict = lambda x: "fits" if x.peak <= usable else "does not fit"  # noqa: E731
        lines.append(f"  {f'on {name} GPUs ({usable / GIB:.0f} GiB usable)':<54}{verdict(plain):>14}{verdict(recomputed):>16}")
    lines += ["", f"activations per layer and token ({a.layers[0]} layer):"]
    lines += [f"  {size:10,.0f} B  {name}" for name, size in plain.terms.items() if size]
    lines.append(f"  {sum(plain.terms.values()):10,.0f} B  total; x {layout.tokens:,} tokens a micro-batch per GPU")
    run = measured_throughput(config, layout)
    tokens_per_step = layout.global_batch_size * layout.seq_length
    if run is None:
        lines.append("\nstep time: no measurement of this model, sequence, micro-batch, recompute and TP/PP/CP layout in "
                     "bench/results/ (bench/pretrain.py or bench/estimate_check.py measures one)")
    else:
        replicas = run.get("world_size", 1) // (layout.tensor * layout.pipeline * layout.context)
        step = tokens_per_step / (run["tokens_per_s"] / replicas * layout.data)
        vocab = run.get("vocab_size")
        lines.append(
            f"\nstep time: about {step:.2f} s ({tokens_per_step / step:,.0f} tokens/s), from {run['tokens_per_s']:,.0f} tokens/s measured on "
            f"{run.get('device', '?')} ({run['source']}, {run.get('date', 'undated')}; vocab "
            f"{vocab if vocab else 'not recorded'}), scaled to {layout.data} data-parallel replica(s) without the gradient all-reduce"
        )
    return "\n".join(lines)


def _world_size(config, given: Optional[int]) -> int:
    if given:
        return given
    for key in ("SLURM_NTASKS", "WORLD_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    p = config.parallel
    return p.tensor * p.pipeline * p.context * max(p.data, 1)


def main(argv=None) -> int:
    # megatron-core announces at import that it falls back from Apex/Transformer Engine, which we do not use
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).* not installed")
    import torch

    from pretrain.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m pretrain.estimate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file (see configs/)")
    parser.add_argument("--gpus", type=int, help="world size (default: SLURM_NTASKS, WORLD_SIZE, or the config's "
                        "tensor x pipeline x context x data)")
    parser.add_argument("--vocab-size", type=int, help=f"default: the config's tokenizer, else {PAPER_VOCAB}")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="check against a GPU of this many GiB "
                        "(default: the GPU of this machine, if any) and exit 2 if the layout does not fit")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        world = _world_size(config, args.gpus)
        vocab = args.vocab_size or vocab_size_of(config)
        note = "given" if args.vocab_size else "the config's tokenizer" if vocab else "the paper's; pass --vocab-size"
        vocab = vocab or PAPER_VOCAB
        print(report(config, world, vocab, note))
        if args.gpu_memory:
            check_fits(config, world, vocab, int(args.gpu_memory * GIB), f"a GPU of {args.gpu_memory:g} GiB")
        elif torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(0)
            check_fits(config, world, vocab, gpu.total_memory, gpu.name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
