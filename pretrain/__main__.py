"""`python -m pretrain`: the training program of pretrain/train.py, started without third-party noise
(kla_megatron silences megatron-core's import warnings, pretrain DeepSpeed's accelerator notice).
Without CUDA, megatron's tensor-parallel layers also give a CUDA tuning hint
(CUDA_DEVICE_MAX_CONNECTIONS) that means nothing on a CPU; it is silenced here.
"""

import sys
import warnings

import torch

if not torch.cuda.is_available():
    warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS")

import kla_megatron  # noqa: E402,F401  (first: it silences megatron-core's import noise)
from pretrain.train import main  # noqa: E402

sys.exit(main())
