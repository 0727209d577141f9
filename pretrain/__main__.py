"""`python -m pretrain`: the training program of pretrain/train.py, started without third-party noise.

Silenced here, once, before anything imports megatron-core or DeepSpeed, because none of it says
anything about this run:
- megatron-core warns at import, on every rank, that it falls back from Apex / Transformer Engine,
  which this project does not use;
- its checkpoint loader calls torch APIs that torch deprecates (a FutureWarning on every resume);
- DeepSpeed warns that it chose its CPU accelerator when there is no GPU: the start-up line says
  "on cpu" already; and megatron's tensor-parallel layers give a CUDA tuning hint
  (CUDA_DEVICE_MAX_CONNECTIONS), which means nothing without CUDA.
"""

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).* not installed")
warnings.filterwarnings("ignore", category=FutureWarning, message="`load_state_dict` is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, message="Please use DTensor instead and we are deprecating ShardedTensor")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS")

from pretrain.train import main  # noqa: E402

sys.exit(main())
