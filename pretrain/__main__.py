"""`python -m pretrain`: the training program of pretrain/train.py, started without third-party noise
(kla_megatron silences megatron-core's import warnings, pretrain DeepSpeed's accelerator notice).
It sets CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron's tuning for tensor parallelism) unless the environment sets it.
"""

import os
import sys

# One hardware queue per GPU, before CUDA starts: megatron's tensor- and sequence-parallel layers rely on it to
# run their asynchronous all-reduce / all-gather ahead of the weight-gradient GEMMs; every GPU number in README
# was measured with it.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import kla_megatron  # noqa: E402,F401  (first: it silences megatron-core's import noise)
from pretrain.train import main  # noqa: E402

sys.exit(main())
