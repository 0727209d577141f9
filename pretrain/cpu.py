"""Lets megatron-core run its schedules and dist_checkpointing on a machine without CUDA.

megatron-core 0.16 is device-neutral in what it computes but not in its bookkeeping: the
schedules allocate token counters and pipeline buffers with device="cuda", the torch_dist checkpoint
writer calls torch.cuda.synchronize() and allocates small flags on torch.cuda.current_device(), and a
tied embedding is moved to the GPU with .cuda() when a pipeline splits it.
On a CPU-only run (tests, CI, the embedded default) `cuda_bookkeeping_on_cpu` sends such explicit
CUDA allocations to the CPU and makes the CUDA sync a no-op; on a GPU it is never entered.
"""

import contextlib
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode


class _CudaAllocationsOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # e.g. the tied embedding's copy on the last pipeline stage
            return args[0]
        device = kwargs.get("device")
        # A bare int is a CUDA ordinal (what torch.cuda.current_device() returns).
        if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_bookkeeping_on_cpu():
    if torch.cuda.is_available():
        yield
        return
    with (
        _CudaAllocationsOnCpu(),
        mock.patch("torch.cuda.synchronize", lambda *a, **k: None),
        mock.patch("torch.cuda.current_device", lambda: 0),
    ):
        yield
