"""megatron-core modules for KLA language models: the mixer, layer/model specs, configs."""

from kla_megatron.config import NAMED_MODELS, ModelConfig, named_model, transformer_config
from kla_megatron.mixer import KLAMixer
from kla_megatron.model import ModelChunks, build_model, build_model_chunks, padded_vocab_size

__all__ = ["NAMED_MODELS", "ModelConfig", "named_model", "transformer_config", "KLAMixer", "build_model", "build_model_chunks", "ModelChunks", "padded_vocab_size"]
