import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter and DeepSpeed uses its CPU
# accelerator. Both read these at import time, so they are set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
