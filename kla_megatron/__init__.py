"""megatron-core modules for KLA language models: the mixer, layer/model specs, configs.

Silenced here, before megatron-core is first imported, because none of it is about a run of ours:
megatron-core warns at import that it falls back from Apex / Transformer Engine, which this project
does not use, and its checkpoint loader calls torch APIs that torch deprecates (a FutureWarning on
every load).
"""

import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).* not installed")
warnings.filterwarnings("ignore", category=FutureWarning, message="`load_state_dict` is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, message="Please use DTensor instead and we are deprecating ShardedTensor")

from kla_megatron.config import NAMED_MODELS, ModelConfig, named_model, transformer_config
from kla_megatron.mixer import KLAMixer
from kla_megatron.model import ModelChunks, build_model, build_model_chunks, padded_vocab_size

__all__ = ["NAMED_MODELS", "ModelConfig", "named_model", "transformer_config", "KLAMixer", "build_model", "build_model_chunks", "ModelChunks", "padded_vocab_size"]
