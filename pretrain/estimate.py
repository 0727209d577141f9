"""Memory and step time per GPU for a training config and parallel layout, before any GPU is used.

    python -m pretrain.estimate --config configs/kla_1.3b.toml [--gpus 16] [--vocab-size 32000] [key=value ...]

Prints, for the GPU that holds the most (a pipeline rank: the first holds the most micro-batches, the last
the logits), what training keeps in GPU memory without activation recompute, with full and with selective
recompute (the config's training.recompute_modules, else all of them), whether it
fits 80 GB and 141 GB GPUs, and the step time expected from a measured throughput (bench/results/*.json).
`python -m pretrain` runs the same estimate before it allocates anything and refuses a layout that cannot
fit its GPU unless `parallel.force_layout=true`. It estimates the GPU code paths (Triton kernels, megatron's
fused SwiGLU, flash attention); CPU runs take other paths.

What is counted (bytes; P = parameters on this GPU, D = ZeRO's sharding degree = data x context parallel
ranks, e = 2 in bf16 runs and 4 in fp32 runs):

  parameters     e P (the weights megatron computes with)
  optimizer      4 P / D fp32 master weights + 8 P / D Adam moments (two fp32 states)
  gradients      as DeepSpeed keeps them for pretrain.zero's config (bf16 gradients summed in fp32):
                 ZeRO-1 in bf16 (DeepSpeed's BF16_Optimizer): a full fp32 gradient buffer (4 P); each bf16
                 gradient autograd writes is added to it and freed at once (one parameter's at a time);
                 ZeRO-2 in bf16: this rank's fp32 partition (4 P / D), and during a backward the bf16 reduce
                 bucket (B = zero_optimization.reduce_bucket_size elements: 1 GB at DeepSpeed's 5e8); a full
                 bucket's reduction flattens and converts it to fp32, a destination's share at a time
                 ((e + 4) min(P, B) / D): after the backward, or, when P > B, during it (counted so);
                 fp32 runs: the gradients (4 P, 4 P / D with ZeRO-2) and the fp32 reduce bucket
  step           the optimizer step's transients, activations gone by then: ZeRO-1 in bf16: its all-reduce
                 flattens the fp32 buffer into one copy (4 P, when P <= 5e8); ZeRO-2 in bf16: the bucket and the last reduction at the end of the backward (the
                 step reads the partition in place); fp32 runs 4 P / D

  activations    per layer and token, what autograd keeps for the backward (below), times the tokens of one
                 micro-batch on this GPU (micro_batch_size x seq_length / context), times the layers of a
                 model chunk, times the chunk-micro-batches in flight: 1 without pipelining; 1F1B on
                 pipeline rank r: min(pipeline - r, micro-batches); interleaved (v chunks a rank):
                 2 (pipeline - r - 1) + (v - 1) pipeline + 1. Full recompute keeps only each layer's input
                 (e h' per token) and rebuilds one layer at a time in the backward (counted apart: "rebuilt").
                 Selective recompute of "mlp" keeps the MLP's input only (its fc1 output and fc2 input leave:
                 3 e F') and rebuilds one layer's MLP at a time in the backward (also "rebuilt")
  logits         last stage: the logits (e V' per token, V' = padded vocabulary / TP), which our cross
                 entropy keeps and overwrites with their own gradient, and its per-token labels and
                 statistics (16); the final norm's input and output (2 e h' + 4)
  backward       one layer's gradient temporaries (the kernel's dq, dk, dv, ... or flash attention's)

  peak = parameters + optimizer + gradients
         + max(backward gradient buffers + activations + megatron's buffer + backward temporaries
               + max(logits, the layer rebuilt by recompute), step)
         the logits (and their gradient, written in their place) are freed by the output layer's backward,
         before recompute rebuilds any layer (measured on an H200: 0.7-2.4% above the peak at 64K-512K tokens)

Per layer and token, on one tensor-parallel rank (h' = hidden / TP with sequence parallelism, else hidden;
H' = heads / TP; K, V = key and value head dims; d = attention head dim; F' = ffn / TP; C' = H'(2K + V) conv
channels):

  every layer      two RMSNorms (fused kernel): each keeps its input and one fp32 scale a row (e h' + 4)
                   and its output, which the next linear keeps (e h'); MLP (megatron's fused SwiGLU):
                   fc1 output (2 e F') and fc2 input (e F')
  KLA / GDN mixer  in_proj output, kept whole by the conv (its q, k, v input) and the output norm (z, its
                   gate): e H'(2K + 2V + 2); the contiguous q, k, v the recurrence keeps (e C'); eight fp32
                   scalars a head (a + dt_bias, softplus, g, sigmoid(b), the kernel's g and eta, gate cumsum,
                   inverse key and query norms: 32 H'); the chunk inverse (64 e H'); with
                   model.kernel_keep_states also w, the new values and the per-chunk states
                   (e H'(K + V + K V / 64)); the output norm's input o and scales (e H'V + 4 H'); the output
                   projection's input (e H'V). With context parallelism also every rank's K x K transition
                   and the incoming K x V state, fp32, per sequence (4 H'K (context K + V) / s' a token)
  attention        qkv output (its v is kept by flash attention: 3 e H'd); q and k after RoPE (2 e H'd) and
                   the cos and sin per position (4 e d / micro-batch); flash attention's output and
                   log-sum-exp (e H'd + 4 H'); the output projection's input (e H'd)
  pipeline         ranks after the first keep each in-flight micro-batch's received input and sent output
                   (2 e h')
  buffer           megatron's global buffer for the all-gathered input of sequence-parallel linears
                   (e hidden x micro_batch_size x seq_length / context), allocated once

Not counted: the CUDA context, NCCL's buffers and the allocator's fragmentation (outside
torch.cuda.max_memory_allocated, which this estimates): a layout is refused above `usable_bytes(total)`
of the GPU, not above its total.
"""

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kernels.kla.sequences import CHUNK
from kla_megatron.config import RECOMPUTE_MODULES
from kla_megatron.mixer_math import MixerShape
from pretrain.config import ConfigError
from pretrain.layout import ParallelLayout

GIB = 2**30
PAPER_VOCAB = 32000
GPU_SIZES = {"80 GB": 81559 * 2**20, "141 GB": 143771 * 2**20}  # total_memory of an H100 80GB / H200
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def usable_bytes(total_memory: int) -> int:
    """What torch may allocate on a GPU of `total_memory` bytes: the CUDA context, NCCL's buffers and
    the caching allocator's fragmentation take the rest (about 3 GiB, or 5%, whichever is more)."""
    return total_memory - max(3 * GIB, total_memory // 20)


@dataclass(frozen=True)
class Step:
    """One training step on the GPUs: the parallel layout and what each GPU computes in it."""

    layout: ParallelLayout
    micro_batch_size: int
    seq_length: int
    global_batch_size: int
    recompute: bool
    bf16: bool
    recompute_modules: tuple = ()
    """Selective recompute: megatron's modules of every layer rebuilt in the backward."""

    @property
    def num_microbatches(self) -> int:
        return max(1, self.global_batch_size // (self.micro_batch_size * self.layout.data))

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one GPU."""
        return self.micro_batch_size * self.seq_length // self.layout.context

    @property
    def element(self) -> int:
        return 2 if self.bf16 else 4

    @staticmethod
    def of(config, world_size: int, bf16: Optional[bool] = None) -> "Step":
        """The step of `config` on `world_size` GPUs; a layout that cannot be built raises ConfigError."""
        t = config.training
        layout = ParallelLayout.build(config.parallel, config.model.resolve(), world_size, True, config.data.seq_length)
        if bf16 is None:
            bf16 = t.precision != "fp32"  # auto means bf16 on the GPUs this estimates
        return Step(layout, t.micro_batch_size, config.data.seq_length, t.global_batch_size, t.recompute, bf16,
                    tuple(t.recompute_modules))

    def describe(self) -> str:
        return f"{self.layout.world_size} GPU(s): {self.layout.describe()}, {'bf16' if self.bf16 else 'fp32'}"


# -- per-token activations -----------------------------------------------------------------------------

def layer_terms(model, mixer: str, step: Step) -> dict:
    """Bytes that one layer keeps for its backward, per token of this GPU's micro-batch, by what keeps them
    (under the step's selective recompute what a rebuilt module would keep counts 0: megatron's checkpoint keeps
    only the module's input, which is kept already)."""
    e, layout = step.element, step.layout
    h = model.hidden_size // layout.tensor if layout.sequence_parallel else model.hidden_size
    ffn = model.ffn_hidden_size // layout.tensor
    heads = model.num_heads // layout.tensor
    terms = {
        "norms: inputs and scales": 2 * (e * h + 4),
        "norm outputs (in_proj or qkv and fc1 inputs)": 2 * e * h,
        "MLP: fc1 output and fc2 input": 0 if "mlp" in step.recompute_modules else 3 * e * ffn,
    }
    if mixer == "attention":
        d = model.attention_head_dim
        terms.update({
            "attention: qkv output": 3 * e * heads * d,
            "attention: q, k after RoPE, cos and sin": 2 * e * heads * d + 4 * e * d / step.micro_batch_size,
            "attention: flash output and log-sum-exp": e * heads * d + 4 * heads,
            "attention: output projection input": e * heads * d,
        })
        return terms
    K, V = model.key_head_dim, model.value_head_dim
    shape = MixerShape(heads, K, V)
    terms.update({
        "mixer: in_proj output (conv input, gate z)": e * sum(shape.projection_split),
        "mixer: q, k, v": e * shape.conv_channels,
        "mixer: gate scalars, per-token factors (fp32)": 32 * heads,
        "mixer: chunk inverse": e * CHUNK * heads,
        "mixer: output norm input and scales": e * heads * V + 4 * heads,
        "mixer: out_proj input": e * heads * V,
    })
    if model.kernel_keep_states:
        terms["mixer: kept states (w, new values, per-chunk h)"] = e * heads * (K + V + K * V / CHUNK)
    if layout.context > 1:
        sequence = step.seq_length // layout.context
        terms["mixer: context-parallel transitions, incoming state"] = 4 * heads * K * (layout.context * K + V) / sequence
    return terms


def rebuilt_bytes(model, step: Step) -> float:
    """Bytes per token that selective recompute rebuilds for one layer at a time in its backward."""
    return 3 * step.element * model.ffn_hidden_size // step.layout.tensor if "mlp" in step.recompute_modules else 0


def backward_temporaries(model, mixer: str, step: Step) -> float:
    """Bytes per token that one layer's backward allocates on top of what its forward kept."""
    e, heads = step.element, model.num_heads // step.layout.tensor
    if mixer == "attention":  # flash attention's dq, dk, dv and its fp32 row sums
        return 3 * e * heads * model.attention_head_dim + 4 * heads
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


def chunk_layers(model, layout: ParallelLayout) -> list:
    """The mixers of every model chunk, in layer order (pipeline x virtual_pipeline chunks)."""
    chunks = layout.pipeline * layout.virtual_pipeline
    sizes = layout.pipeline_layers or [model.num_layers // chunks] * chunks
    starts = [sum(sizes[:i]) for i in range(chunks)]
    return [[model.layer_mixer(layer + 1) for layer in range(start, start + size)] for start, size in zip(starts, sizes)]


def rank_parameters(model, vocab_rows: int, layout: ParallelLayout, rank: int) -> int:
    """Parameters on pipeline rank `rank` (its chunks rank, rank + pipeline, ...) of one tensor-parallel rank."""
    chunks = chunk_layers(model, layout)
    mine = range(rank, len(chunks), layout.pipeline)
    count = sum(layer_parameters(model, mixer, layout.tensor) for c in mine for mixer in chunks[c])
    embedding = vocab_rows * model.hidden_size // layout.tensor
    if 0 in mine:
        count += embedding
    if len(chunks) - 1 in mine:
        count += model.hidden_size  # final norm
        if not (model.tie_embeddings and len(chunks) == 1):
            count += embedding  # output layer
    return count


# -- the estimate ------------------------------------------------------------------------------------

@dataclass
class RankMemory:
    """Bytes on one GPU of a pipeline rank."""

    rank: int
    parameters: int
    layers: int
    in_flight: int
    """Model-chunk micro-batches whose activations this rank holds at once."""
    weights: float = 0
    gradients: float = 0
    gradient_buffers: float = 0
    """Not held between steps: bf16 gradients waiting to be summed in fp32, reduce buckets."""
    optimizer: float = 0
    step: float = 0
    activations: float = 0
    rebuilt: float = 0
    """Recompute: what the backward rebuilds at a time (full: one layer; selective: its modules of one layer)."""
    logits: float = 0
    backward: float = 0
    buffers: float = 0

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def training(self) -> float:
        """The peak of the forward and backward: backward temporaries on top of the logits (the output layer's
        backward and the first layers' overlap them) or, under recompute, of the rebuilt layer, whichever is
        larger: the logits are freed before any layer is rebuilt."""
        return (self.static + self.gradient_buffers + self.activations + self.buffers + self.backward
                + max(self.logits, self.rebuilt))

    @property
    def peak(self) -> float:
        return max(self.training, self.static + self.step)


@dataclass
class Estimate:
    model: object
    step: Step
    vocab_size: int
    vocab_rows: int
    total_parameters: int
    ranks: list  # RankMemory, one per pipeline rank
    terms: dict = field(default_factory=dict)  # per-layer activation terms of the first layer's kind

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def peak(self) -> float:
        return self.worst.peak


def gradient_memory(config, step: Step, parameters: int) -> tuple:
    """(gradients, gradient buffers, step transients) in bytes for a rank of `parameters` parameters, as
    DeepSpeed keeps them for the config pretrain.zero builds (its ZeRO stage, fp32 gradient accumulation)."""
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pretrain.zero import deepspeed_config

    P, D, e = parameters, step.layout.data_context, step.element
    ds = deepspeed_config(config, step.bf16, D)
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    assert ds["data_types"]["grad_accum_dtype"] == "fp32", "the counts below are for fp32 gradient accumulation"
    bucket = zero.reduce_bucket_size * (2 if zero.overlap_comm else 1) if zero.contiguous_gradients else 0
    if not step.bf16:  # the ZeRO optimizer on the model's own fp32 gradients, its fp32 reduce bucket
        return 4 * P / (D if zero.stage == 2 else 1), 4 * bucket, 4 * P / D
    if zero.stage == 1:
        # BF16_Optimizer: the full fp32 gradient buffer; a hook on each parameter adds its bf16 gradient to it
        # and frees it (pretrain.zero asks for immediate_grad_update); the step's all-reduce flattens the fp32
        # buffer into one copy when it fits one allreduce bucket (a single larger tensor is reduced in place).
        assert ds["bf16"]["immediate_grad_update"], "the counts below are for per-parameter fp32 accumulation"
        return 4 * P, 0, 4 * P if P <= MEMORY_OPT_ALLREDUCE_SIZE else 0
    # ZeRO-2: this rank's fp32 partition, and the bf16 reduce bucket from a backward's first gradient to its
    # end. A full bucket is flattened and converted to fp32 for its reduction, a destination rank's share at a
    # time: at the end of the backward, activations gone, unless the rank has more parameters than the bucket
    # holds (then during the backward, counted beside all activations: an upper bound). The optimizer step
    # reads the fp32 partition in place.
    reduction = (e + 4) * min(P, zero.reduce_bucket_size) / D
    during_backward = reduction if P > zero.reduce_bucket_size else 0
    return 4 * P / D, e * bucket + during_backward, e * bucket + reduction


def in_flight(layout: ParallelLayout, rank: int, microbatches: int) -> int:
    """Model-chunk micro-batches whose activations pipeline rank `rank` holds at once under megatron's
    schedules: its warm-up forwards and one more."""
    if layout.pipeline == 1:
        return 1
    chunks = layout.virtual_pipeline
    warmup = layout.pipeline - rank - 1 if chunks == 1 else 2 * (layout.pipeline - rank - 1) + (chunks - 1) * layout.pipeline
    return min(warmup + 1, microbatches * chunks)


def with_recompute(config, full: bool, modules=()):
    """`config` with training.recompute=full and training.recompute_modules=modules."""
    return dataclasses.replace(config, training=dataclasses.replace(config.training, recompute=full, recompute_modules=list(modules)))


def estimate(config, world_size: int, vocab_size: int, bf16: Optional[bool] = None) -> Estimate:
    """The memory of each pipeline rank's GPU for `config` on `world_size` GPUs."""
    from kla_megatron.model import padded_vocab_size

    model = config.model.resolve()
    step = Step.of(config, world_size, bf16)
    layout, e, t = step.layout, step.element, step.tokens
    vocab_rows = padded_vocab_size(vocab_size, layout.tensor)
    h = model.hidden_size // layout.tensor if layout.sequence_parallel else model.hidden_size
    chunks = chunk_layers(model, layout)
    ranks = []
    for rank in range(layout.pipeline):
        mine = [chunks[c] for c in range(rank, len(chunks), layout.pipeline)]
        P = rank_parameters(model, vocab_rows, layout, rank)
        flight = in_flight(layout, rank, step.num_microbatches)
        m = RankMemory(rank, P, sum(map(len, mine)), flight)
        m.weights = e * P
        m.optimizer = 12 * P / layout.data_context
        m.gradients, m.gradient_buffers, m.step = gradient_memory(config, step, P)
        per_layer = {mixer: sum(layer_terms(model, mixer, step).values()) for chunk in mine for mixer in chunk}
        per_chunk = max(sum(per_layer[mixer] for mixer in chunk) for chunk in mine)
        if step.recompute:  # each layer's input kept, and one layer rebuilt at a time in the backward
            per_chunk = max(map(len, mine)) * e * h
            m.rebuilt = max(per_layer.values()) * t
        else:  # selective: one layer's rebuilt modules at a time (none without it)
            m.rebuilt = rebuilt_bytes(model, step) * t
        m.activations = per_chunk * t * flight
        if rank > 0:
            m.activations += 2 * e * h * t * flight  # the schedule's received inputs and sent outputs
        if 0 in range(rank, len(chunks), layout.pipeline):
            m.activations += 8 * t * flight  # token ids kept by the embedding
        if len(chunks) - 1 in range(rank, len(chunks), layout.pipeline):
            m.logits = (e * vocab_rows // layout.tensor + 2 * e * h + 4 + 16) * t
        m.backward = max(backward_temporaries(model, mixer, step) for mixer in per_layer) * t
        if layout.sequence_parallel:
            m.buffers = e * model.hidden_size * t
        ranks.append(m)
    total = sum(layer_parameters(model, model.layer_mixer(i + 1), 1) for i in range(model.num_layers))
    total += (1 if model.tie_embeddings else 2) * vocab_rows * model.hidden_size + model.hidden_size
    return Estimate(model, step, vocab_size, vocab_rows, total, ranks, layer_terms(model, chunks[0][0], step))


def without_kept_states(config):
    """`config` with model.kernel_keep_states=false: the recurrence's backward recomputes its per-chunk states."""
    model = dataclasses.replace(config.model, overrides={**config.model.overrides, "kernel_keep_states": False})
    return dataclasses.replace(config, model=model)


def check_fits(config, world_size: int, vocab_size: int, total_memory: int, device_name: str = "this GPU") -> Estimate:
    """The estimate, or a ConfigError naming the overflow and the settings that would shrink it."""
    result = estimate(config, world_size, vocab_size)
    limit = usable_bytes(total_memory)
    if result.peak <= limit:
        return result
    worst, step = result.worst, result.step
    hints = []
    if result.model.kernel_keep_states and result.model.mixer != "attention":
        lean = estimate(without_kept_states(config), world_size, vocab_size).peak
        if lean <= limit:  # the cheapest fix: measured 2-5% slower on kla-0.4b (README)
            hints.append(f"model.kernel_keep_states=false ({lean / GIB:.1f} GiB, a few percent slower)")
    if not step.recompute and set(step.recompute_modules) != set(RECOMPUTE_MODULES):
        selective = estimate(with_recompute(config, False, RECOMPUTE_MODULES), world_size, vocab_size).peak
        if selective <= limit:
            hints.append(f"training.recompute_modules={json.dumps(list(RECOMPUTE_MODULES))} ({selective / GIB:.1f} GiB)")
    if not step.recompute:
        full = estimate(with_recompute(config, True), world_size, vocab_size).peak
        if full <= limit:
            clear = " training.recompute_modules=[]" if step.recompute_modules else ""
            hints.append(f"training.recompute=true{clear} ({full / GIB:.1f} GiB)")
    if step.micro_batch_size > 1:
        hints.append("a smaller training.micro_batch_size")
    if step.layout.zero_stage == 1 and step.layout.pipeline == 1 and step.layout.data_context > 1:
        hints.append("parallel.zero_stage=2")
    hints.append("more parallel.tensor or parallel.pipeline")
    raise ConfigError(
        f"this layout needs about {result.peak / GIB:.1f} GiB per GPU (pipeline rank {worst.rank}: "
        f"{worst.static / GIB:.1f} GiB weights, gradients and optimizer, {(worst.activations + worst.rebuilt) / GIB:.1f} GiB activations) "
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


def _same_work_per_gpu(run: dict, config, step: Step) -> bool:
    """Whether a measured run did the same work per GPU: same model, sequence, micro-batch, recompute (full or selective),
    kernels and model-parallel layout (data parallelism only repeats it)."""
    c, layout = run["config"], step.layout
    parallel = c.get("parallel", {})
    return (
        c["model"] == config.to_dict()["model"]
        and c["data"]["seq_length"] == step.seq_length
        and c["training"]["micro_batch_size"] == step.micro_batch_size
        and c["training"].get("recompute", False) == step.recompute
        and set(c["training"].get("recompute_modules", [])) == set(step.recompute_modules)
        and all(parallel.get(k, 1) == getattr(layout, k) for k in ("tensor", "pipeline", "virtual_pipeline", "context"))
        and parallel.get("sequence_parallel", False) == layout.sequence_parallel
    )


def measured_throughput(config, step: Step) -> Optional[dict]:
    """The newest measured run of the same per-GPU work, or None."""
    runs = [r for r in _measured_runs() if _same_work_per_gpu(r, config, step)]
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
    chosen = config.training.recompute_modules
    modules = chosen or RECOMPUTE_MODULES
    plain = estimate(with_recompute(config, False), world_size, vocab_size)
    columns = [("no recompute", plain), ("full recompute", estimate(with_recompute(config, True), world_size, vocab_size)),
               ("selective", estimate(with_recompute(config, False, modules), world_size, vocab_size))]
    step, layout, model = plain.step, plain.step.layout, plain.model
    a = plain.worst
    rows = [
        (f"parameters ({a.parameters / 1e6:,.0f}M on this GPU)", lambda m: m.weights),
        (f"optimizer (fp32 master + Adam, sharded {layout.data_context} ways)", lambda m: m.optimizer),
        (f"gradients (ZeRO-{layout.zero_stage})", lambda m: m.gradients),
        ("gradient buffers during a backward", lambda m: m.gradient_buffers),
        (f"activations ({a.layers} layers, {a.in_flight} micro-batch(es) in flight)", lambda m: m.activations),
        ("  rebuilt by recompute in a layer's backward", lambda m: m.rebuilt),
        ("logits and final norm (freed before anything is rebuilt)", lambda m: m.logits),
        ("backward temporaries, buffers", lambda m: m.backward + m.buffers),
        ("peak (torch.cuda.max_memory_allocated)", lambda m: m.peak),
    ]
    header = "".join(f"{name:>16}" for name, _ in columns)
    lines = [
        f"{config.model.name} ({model.mixer}, {model.num_layers} layers, hidden {model.hidden_size}; vocab {vocab_size} "
        f"({vocab_note}) -> {plain.vocab_rows} rows) | {step.describe()}",
        f"micro-batch {step.micro_batch_size} x {step.seq_length} tokens, {step.num_microbatches} micro-batch(es) a step, "
        f"{step.global_batch_size * step.seq_length:,} tokens a step | {plain.total_parameters / 1e9:.2f}B parameters",
        "",
        f"{f'GiB per GPU (pipeline rank {a.rank} of {layout.pipeline})':<56}{header}",
    ]
    lines += [f"  {label:<54}" + "".join(f"{value(e.worst) / GIB:>16.2f}" for _, e in columns) for label, value in rows]
    for name, size in GPU_SIZES.items():
        usable = usable_bytes(size)
        lines.append(f"  {f'on {name} GPUs ({usable / GIB:.0f} GiB usable)':<54}"
                     + "".join(f"{'fits' if e.peak <= usable else 'does not fit':>16}" for _, e in columns))
    lines.append(f"  selective: training.recompute_modules={json.dumps(list(modules))}"
                 + ("" if chosen else " (all of them; the config selects none)"))
    selective = columns[2][1]
    rebuilt = rebuilt_bytes(model, selective.step)
    lines += ["", f"activations per layer and token (first layer), bytes:{'no recompute':>16}{'selective':>12}"]
    lines += [f"  {name:<52}{size:>16,.0f}{selective.terms[name]:>12,.0f}" for name, size in plain.terms.items() if size]
    lines.append(f"  {'total':<52}{sum(plain.terms.values()):>16,.0f}{sum(selective.terms.values()):>12,.0f}")
    lines.append(f"  {'selective: one layer rebuilt at a time in its backward':<52}{'':>16}{rebuilt:>12,.0f}")
    lines.append(f"  x {step.tokens:,} tokens a micro-batch per GPU")
    run = measured_throughput(config, Step.of(config, world_size))
    tokens_per_step = step.global_batch_size * step.seq_length
    if run is None:
        lines.append("\nstep time: no measurement of this model, sequence, micro-batch, recompute and TP/PP/CP layout in "
                     "bench/results/ (bench/pretrain.py or bench/estimate_check.py measures one)")
    else:
        replicas = run.get("world_size", 1) // (layout.tensor * layout.pipeline * layout.context)
        seconds = tokens_per_step / (run["tokens_per_s"] / replicas * layout.data)
        vocab = run.get("vocab_size")
        lines.append(
            f"\nstep time: about {seconds:.2f} s ({tokens_per_step / seconds:,.0f} tokens/s), from {run['tokens_per_s']:,.0f} tokens/s "
            f"measured on {run.get('device', '?')} ({run['source']}, {run.get('date', 'undated')}; vocab "
            f"{vocab if vocab else 'not recorded'}), scaled to {layout.data} data-parallel replica(s) without the gradient all-reduce"
        )
    return "\n".join(lines)


def world_size_of(config, given: Optional[int] = None) -> int:
    """The GPU count to estimate for: `given`, else the launcher's (Slurm's tasks, torchrun's world), else the
    config's tensor x pipeline x context x data."""
    if given:
        return given
    for key in ("SLURM_NTASKS", "WORLD_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    p = config.parallel
    return p.tensor * p.pipeline * p.context * max(p.data, 1)


def main(argv=None) -> int:
    import kla_megatron  # noqa: F401  (first: it silences megatron-core's import noise)
    import torch

    from pretrain.config import load_config

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
        world = world_size_of(config, args.gpus)
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
