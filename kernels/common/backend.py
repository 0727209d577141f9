"""Which implementation an op runs: "torch" (plain PyTorch, any device), "triton" (CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1) or "auto" (Triton on CUDA tensors, PyTorch otherwise)."""

import os

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def use_triton(backend, x) -> bool:
    if backend == "auto":
        return x.is_cuda
    if backend == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        return True
    return False
