"""What a run reports: a console line per log interval (loss, lr, tokens/s, TFLOP/s on GPUs, memory,
ETA), the same scalars in TensorBoard every step, and a summary at the end. Only the last pipeline
stage's data-parallel rank 0 writes.

Throughput on the console is averaged over the steps of the logging interval, and counts only the
steps themselves (not validation or checkpoints); the ETA is the wall time of this run so far per
step, validation and checkpoints included, so one slow or fast step does not swing it.
"""

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
    def __init__(self, log_dir: Optional[Path], total_steps: int, tokens_per_step: int, flops_per_token: float,
                 world_size: int, start_step: int = 0):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides what the interrupted one logged after its last checkpoint.
            self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.on_gpu = torch.cuda.is_available()
        self.start_step = start_step
        self._run_start = None
        self._mark = None
        self._interval = [0, 0.0]  # steps and their seconds since the last console line
        self._trained = [0, 0.0]  # steps and their seconds in this run
        self.last_train = None  # (step, loss)
        self.last_valid = None  # (step, loss)

    def start(self) -> None:
        """The clock of the next step starts now (at the start of the run, and after a checkpoint)."""
        self._mark = time.perf_counter()
        if self._run_start is None:
            self._run_start = self._mark

    def train(self, step: int, loss: float, lr: float, grad_norm: float, log: bool) -> None:
        now = time.perf_counter()
        seconds = now - self._mark
        self._mark = now
        for totals in (self._interval, self._trained):
            totals[0] += 1
            totals[1] += seconds
        self.last_train = (step, loss)
        tokens_per_s = self.tokens_per_step / seconds
        memory = peak_memory_gib()
        if self.writer:
            for name, value in {
                "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "perf/tokens_per_s": tokens_per_s, "perf/tflops_per_gpu": self._tflops(tokens_per_s),
                "perf/step_seconds": seconds, "perf/peak_memory_gib": memory,
            }.items():
                self.writer.add_scalar(name, value, step)
        if log:
            steps, interval_seconds = self._interval
            self._interval = [0, 0.0]
            tokens_per_s = steps * self.tokens_per_step / interval_seconds
            eta = (now - self._run_start) / (step - self.start_step) * (self.total_steps - step)
            flops = f" | {self._tflops(tokens_per_s):.1f} TFLOP/s/gpu" if self.on_gpu else ""
            print(
                f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_s:,.0f} tok/s{flops} | {'peak mem' if self.on_gpu else 'peak RSS'} {memory:.2f} GiB | "
                f"ETA {_duration(eta)}",
                flush=True,
            )

    def validation(self, step: int, loss: float) -> None:
        ppl = _perplexity(loss)
        self.last_valid = (step, loss)
        if self.writer:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.add_scalar("valid/ppl", ppl, step)
            self.writer.flush()
        print(f"validation at step {step}: loss {loss:.4f} | ppl {ppl:.2f}", flush=True)
        self._mark = time.perf_counter()  # validation time is not the next step's

    def close(self) -> None:
        if self.writer:
            self.writer.close()

    def summary(self, trained: str, outputs: dict) -> None:
        """The run's last words: what was trained, the final losses, the throughput and where the
        results are (`outputs`: label -> path or command)."""
        lines = [f"== {trained}"]
        if self.last_train:
            step, loss = self.last_train
            lines.append(
                f"   steps {self.start_step + 1}-{step} of {self.total_steps} in {_duration(time.perf_counter() - self._run_start)}"
                f" ({step * self.tokens_per_step:,} tokens in all) | final train loss {loss:.4f} (ppl {_perplexity(loss):.2f})"
            )
        if self.last_valid:
            step, loss = self.last_valid
            lines.append(f"   validation at step {step}: loss {loss:.4f} (ppl {_perplexity(loss):.2f})")
        steps, seconds = self._trained
        if steps:
            tokens_per_s = steps * self.tokens_per_step / seconds
            flops = f", {self._tflops(tokens_per_s):.1f} TFLOP/s per GPU" if self.on_gpu else ""
            lines.append(f"   throughput {tokens_per_s:,.0f} tokens/s{flops} (mean over this run's steps)")
        lines += [f"   {label}: {where}" for label, where in outputs.items()]
        print("\n".join(lines), flush=True)

    def _tflops(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.world_size / 1e12


def _perplexity(loss: float) -> float:
    return float(torch.tensor(loss, dtype=torch.float64).exp())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
