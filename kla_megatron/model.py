"""Builds a megatron-core GPTModel whose decoder layers are given by `ModelConfig`."""

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from kernels import vocab_parallel_cross_entropy
from kla_megatron.config import ModelConfig
from kla_megatron.specs import block_spec


class LanguageModel(GPTModel):
    """megatron's GPTModel with the loss computed by our cross-entropy kernel: one read of the output layer's
    (bf16) logits, and their gradient written in their place, instead of an fp32 copy of [tokens, vocabulary]."""

    def __init__(self, *args, loss_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_backend = loss_backend

    def compute_language_model_loss(self, labels, logits):
        """labels [b, s], logits [s, b, this rank's vocabulary slice] -> per-token loss [b, s] fp32."""
        return vocab_parallel_cross_entropy(logits, labels.t(), group=self.pg_collection.tp, backend=self.loss_backend).t()


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """The embedding rows: the tokenizer's vocabulary rounded up to a multiple of 1024, so every TP
    size up to 8 gets shards of a multiple of 128 rows and checkpoints reshard between them unchanged
    (megatron's own rule, a multiple of 128*TP, changes the model with the TP size)."""
    step = 1024 if 1024 % (128 * tensor_parallel) == 0 else 128 * tensor_parallel
    return -(-vocab_size // step) * step


def build_model(model: ModelConfig, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                vp_stage=None, pg_collection=None) -> GPTModel:
    """One model chunk of this pipeline rank (the whole model when pipeline_parallel = 1); vp_stage picks the
    chunk of an interleaved pipeline. pg_collection: megatron's process groups (default: the global ones)."""
    pp_group = pg_collection.pp if pg_collection is not None else parallel_state.get_pipeline_model_parallel_group()
    pp_rank, pp_size = pp_group.rank(), pp_group.size()
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunk = vp_stage or 0
    return LanguageModel(
        config=config,
        transformer_layer_spec=block_spec(model, config, pp_rank, vp_stage),
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=max_sequence_length,
        pre_process=pp_rank == 0 and chunk == 0,
        post_process=pp_rank == pp_size - 1 and chunk == vpp - 1,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope" if model.uses_attention else "none",
        rotary_base=model.rope_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        loss_backend=model.kernel_backend,
    )


class ModelChunks(torch.nn.Module):
    """The model chunks of one pipeline rank (one, or several with an interleaved schedule) as one module, so
    that DeepSpeed wraps (and ZeRO shards) them together: `forward(chunk, ...)` runs chunk `chunk`.

    Its sharded state dict is the union of the chunks' (their checkpoint keys name global layers, so a checkpoint
    does not depend on how layers are split), with module keys under `chunks.<i>.` to load back into this module."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, chunk: int, *args, **kwargs):
        return self.chunks[chunk](*args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        merged = {}
        for i, chunk in enumerate(self.chunks):
            for key, value in chunk.sharded_state_dict(metadata=metadata).items():
                merged[f"{prefix}chunks.{i}.{key}"] = value
        return merged


def build_model_chunks(model: ModelConfig, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                       pg_collection=None) -> ModelChunks:
    """This pipeline rank's chunks: one, or virtual_pipeline_model_parallel_size for an interleaved schedule."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [None] if not vpp else list(range(vpp))
    return ModelChunks([build_model(model, config, vocab_size, max_sequence_length, stage, pg_collection)
                        for stage in stages])
