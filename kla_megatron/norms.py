"""RMSNorm for megatron layer specs, sequence-parallel aware, on CPU and GPU alike, on our fused kernel.

Megatron's own torch-backed norm refuses sequence parallelism and its fused ones need Apex or
Transformer Engine, which the project does not depend on.
"""

import torch
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer import TransformerConfig

from kernels import rms_norm


def param_device(config: TransformerConfig) -> torch.device:
    """Where megatron would place a new parameter for this config."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config))
        )
        # Read by megatron's grad finalisation and by our optimizer grouping (no weight decay).
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sequence_parallel:
            # Each tensor-parallel rank normalises a different slice of the sequence, so the weight's
            # gradient is the sum over ranks: identity forward, all-reduce backward.
            weight = copy_to_tensor_model_parallel_region(weight)
        return rms_norm(x, weight, self.eps, backend=self.backend)  # x [s, b, h]: Triton on GPU under "auto"
