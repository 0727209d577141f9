"""Builds a megatron-core GPTModel whose decoder layers are given by `ModelConfig`."""

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from kla_megatron.config import ModelConfig
from kla_megatron.specs import block_spec


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """The embedding rows: the tokenizer's vocabulary rounded up to a multiple of 1024, so every TP
    size up to 8 gets shards of a multiple of 128 rows and checkpoints reshard between them unchanged
    (megatron's own rule, a multiple of 128*TP, changes the model with the TP size)."""
    step = 1024 if 1024 % (128 * tensor_parallel) == 0 else 128 * tensor_parallel
    return -(-vocab_size // step) * step


def build_model(
    model: ModelConfig, config: TransformerConfig, vocab_size: int, max_sequence_length: int, vp_stage=None
) -> GPTModel:
    """This pipeline stage's part of the model (all of it when pipeline_parallel = 1)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(model, config, pp_rank, vp_stage),
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope" if model.uses_attention else "none",
        rotary_base=model.rope_base,
        vp_stage=vp_stage,
    )
