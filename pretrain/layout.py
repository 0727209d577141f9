"""The parallel layout of a run, in one place: built once from the config and the world size, checked once
(before any process group or GPU memory exists), then handed to everything that needs it.

    world = tensor x pipeline x context x data     (megatron's order of groups: TP innermost)

TP splits heads (and, with sequence parallelism, the sequence between TP ranks outside the mixers); PP splits
layers into stages, each of `virtual_pipeline` chunks (interleaved 1F1B when > 1), evenly or by
`pipeline_layers` (layers per chunk, in layer order: 11 layers on 2 stages are [6, 5]); CP splits every sequence
into contiguous slices; DP replicates the rest, with DeepSpeed ZeRO sharding optimizer state (stage 1) and
gradients (stage 2, no pipeline) over DP x CP, where gradients are summed.
"""

from dataclasses import asdict, dataclass
from typing import Optional

from kernels.kla.sequences import CHUNK
from kla_megatron.config import ModelConfig
from pretrain.config import ConfigError, ParallelSection


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor: int
    pipeline: int
    virtual_pipeline: int
    context: int
    data: int
    sequence_parallel: bool
    zero_stage: int
    pipeline_layers: Optional[tuple]
    """Decoder layers of each model chunk in layer order (pipeline x virtual_pipeline entries), or None: even."""

    @property
    def data_context(self) -> int:
        """Ranks that see different tokens of the same step and sum their gradients (DP x CP)."""
        return self.data * self.context

    def describe(self) -> str:
        vpp = f" (x{self.virtual_pipeline} interleaved)" if self.virtual_pipeline > 1 else ""
        sp = "+SP" if self.sequence_parallel else ""
        return f"TP {self.tensor}{sp} PP {self.pipeline}{vpp} CP {self.context} DP {self.data}, ZeRO-{self.zero_stage}"

    def as_dict(self) -> dict:
        """As JSON keeps it (pipeline_layers a list)."""
        d = asdict(self)
        d["pipeline_layers"] = list(self.pipeline_layers) if self.pipeline_layers else None
        return d

    def megatron_pipeline_layout(self):
        """megatron's pipeline_model_parallel_layout for uneven splits (None for an even split)."""
        if self.pipeline_layers is None:
            return None
        chunks = [["decoder"] * n for n in self.pipeline_layers]
        chunks[0].insert(0, "embedding")
        chunks[-1].append("loss")
        return chunks

    @staticmethod
    def build(p: ParallelSection, model: ModelConfig, world_size: int, cuda: bool, seq_length: int) -> "ParallelLayout":
        """The checked layout; bad combinations raise ConfigError naming the problem and a valid alternative."""
        for name in ("tensor", "pipeline", "virtual_pipeline", "context"):
            if getattr(p, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
        model_parallel = p.tensor * p.pipeline * p.context
        if world_size % model_parallel:
            raise ConfigError(
                f"{world_size} process(es) cannot be split into tensor={p.tensor} x pipeline={p.pipeline} x "
                f"context={p.context}; launch a multiple of {model_parallel} processes, or choose sizes whose product "
                f"divides {world_size}"
            )
        if model.num_heads % p.tensor:
            divisors = [d for d in range(1, model.num_heads + 1) if model.num_heads % d == 0]
            raise ConfigError(
                f"the model's {model.num_heads} heads cannot be split over parallel.tensor={p.tensor}; "
                f"choose one of {divisors}"
            )
        if p.sequence_parallel and p.tensor == 1:
            raise ConfigError("parallel.sequence_parallel splits the sequence between tensor-parallel ranks and needs "
                              "parallel.tensor > 1; set sequence_parallel=false or tensor=2 or more")
        if p.sequence_parallel and not cuda:
            raise ConfigError("parallel.sequence_parallel needs GPUs (megatron forks its CUDA random-number tracker in "
                              "the sequence-parallel embedding); set sequence_parallel=false on CPU")
        if p.virtual_pipeline > 1 and p.pipeline == 1:
            raise ConfigError("parallel.virtual_pipeline > 1 interleaves pipeline stages and needs parallel.pipeline > 1")
        if p.zero_stage not in (1, 2):
            raise ConfigError(f"parallel.zero_stage must be 1 or 2 (got {p.zero_stage}); ZeRO-3 does not fit "
                              "megatron's tensor parallelism")
        if p.zero_stage == 2 and p.pipeline > 1:
            raise ConfigError("ZeRO stage 2 shards gradients, which DeepSpeed cannot combine with pipeline "
                              "parallelism; use parallel.zero_stage=1 with pipeline > 1")
        if seq_length <= 0:
            raise ConfigError(f"data.seq_length must be positive, got {seq_length}")
        if p.context > 1:
            if model.uses_attention:
                raise ConfigError(f"parallel.context={p.context}: the softmax-attention layers of {model.mixer} / hybrid "
                                  "models have no context-parallel path yet; use a KLA or GDN model, or context=1")
            if seq_length % (p.context * CHUNK):
                raise ConfigError(
                    f"data.seq_length={seq_length} must split into parallel.context={p.context} slices of whole "
                    f"{CHUNK}-token kernel chunks: choose a multiple of {p.context * CHUNK}"
                )
        if p.sequence_parallel and (seq_length // p.context) % p.tensor:
            raise ConfigError(f"parallel.sequence_parallel splits each rank's {seq_length // p.context} tokens over "
                              f"parallel.tensor={p.tensor} ranks: choose a sequence length divisible by "
                              f"{p.tensor * p.context}")
        layers = _pipeline_layers(p, model.num_layers)
        return ParallelLayout(
            world_size=world_size, tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
            context=p.context, data=world_size // model_parallel, sequence_parallel=p.sequence_parallel,
            zero_stage=p.zero_stage, pipeline_layers=layers,
        )


def _pipeline_layers(p: ParallelSection, num_layers: int) -> Optional[tuple]:
    chunks = p.pipeline * p.virtual_pipeline
    if p.pipeline_layers:
        layers = tuple(p.pipeline_layers)
        if len(layers) != chunks or any(n < 1 for n in layers) or sum(layers) != num_layers:
            raise ConfigError(
                f"parallel.pipeline_layers={list(layers)} must give {chunks} positive layer counts (pipeline x "
                f"virtual_pipeline) summing to the model's {num_layers} layers, e.g. {_even_split(num_layers, chunks)}"
            )
        return None if chunks == 1 else layers
    if num_layers % chunks:
        raise ConfigError(
            f"{num_layers} layers do not split evenly into {chunks} pipeline chunks; set parallel.pipeline_layers, "
            f"e.g. {_even_split(num_layers, chunks)}"
        )
    return None


def _even_split(num_layers: int, chunks: int) -> list:
    base, extra = divmod(num_layers, chunks)
    return [base + (i < extra) for i in range(chunks)] if base else [1] * chunks
