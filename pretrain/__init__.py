"""The training program; see pretrain/train.py.

Without a GPU, DeepSpeed is told its accelerator is the CPU before anything imports it (the trainer
and the Hugging Face export both reach it through pretrain.zero / pretrain.checkpoint); otherwise it
warns on every command that it chose the CPU itself, which the start-up line says already.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
