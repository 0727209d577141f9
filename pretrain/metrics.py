"""What a run reports: a console line per log interval (loss, lr, tokens/s, TFLOP/s, memory, ETA)
and the same scalars in TensorBoard. Only the last pipeline stage's data-parallel rank 0 writes."""

import resource
import time
from pathlib import Path
from typing import Optional

import torch

from kla_megatron.config import ModelConfig


def model_flops_per_token(model: ModelConfig, vocab_size: int, seq_length: int, chunk: int = 64) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only.

    Linear layers: 2 FLOPs per weight. Chunkwise delta rule per head, forward: intra-chunk
    k k^T, A v, q k^T, (attn) v over a chunk of `chunk` tokens plus the state read and update,
    ~ 2 * (2*C*K + 2*C*V + 3*K*V). Causal softmax attention: 2 * 2 * (T/2) * d per token.
    """
    d, H, K, V = model.hidden_size, model.num_heads, model.key_head_dim, model.value_head_dim
    mlp = 3 * d * model.ffn_hidden_size
    forward = 2 * vocab_size * d
    for layer in range(1, model.num_layers + 1):
        if model.layer_mixer(layer) == "attention":
            width = H * model.attention_head_dim
            forward += 2 * (4 * d * width + mlp) + 2 * 2 * (seq_length / 2) * width
        else:
            in_proj = d * (H * (2 * K + 2 * V) + 2 * H)
            forward += 2 * (in_proj + H * V * d + mlp) + H * 2 * (2 * chunk * K + 2 * chunk * V + 3 * K * V)
    return 3 * forward


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Metrics:
    def __init__(self, log_dir: Optional[Path], total_steps: int, tokens_per_step: int, flops_per_token: float, world_size: int):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self._mark = time.perf_counter()
        self._mark_step = None

    def start(self, step: int) -> None:
        self._mark, self._mark_step = time.perf_counter(), step

    def train(self, step: int, loss: float, lr: float, grad_norm: float, log: bool) -> None:
        now = time.perf_counter()
        steps = step - self._mark_step
        seconds = (now - self._mark) / max(steps, 1)
        tokens_per_s = self.tokens_per_step / seconds
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        memory = peak_memory_gib()
        self._mark, self._mark_step = now, step
        if self.writer:
            for name, value in {
                "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "perf/tokens_per_s": tokens_per_s, "perf/tflops_per_gpu": tflops,
                "perf/step_seconds": seconds, "perf/peak_memory_gib": memory,
            }.items():
                self.writer.add_scalar(name, value, step)
        if log:
            eta = seconds * (self.total_steps - step)
            print(
                f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_s:,.0f} tok/s | {tflops:.2f} TFLOP/s/gpu | mem {memory:.2f} GiB | "
                f"ETA {_duration(eta)}",
                flush=True,
            )

    def validation(self, step: int, loss: float) -> None:
        ppl = float(torch.tensor(loss).exp())
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/ppl", ppl, step)
            self.writer.flush()
        print(f"validation at step {step}: loss {loss:.4f} | ppl {ppl:.2f}", flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
