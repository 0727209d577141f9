"""Helpers for the training-program tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus_overrides(corpus: dict) -> list[str]:
    return [
        f'data.tokenizer="{corpus["tokenizer"]}"',
        f'data.train_prefixes=["{corpus["train"]}"]',
        f'data.valid_prefixes=["{corpus["valid"]}"]',
    ]


def pretrain_command(output_dir: Path, corpus: dict, *overrides: str, resume: bool = False) -> list[str]:
    """`python -m pretrain` on configs/tiny.toml, shrunk to run in seconds on CPU."""
    command = [sys.executable, "-m", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml")]
    if resume:
        command.append("--resume")
    return command + [
        f'output_dir="{output_dir}"', "data.seq_length=64", "training.micro_batch_size=2",
        "training.global_batch_size=4", "training.warmup_steps=1", "logging.interval=1",
        *corpus_overrides(corpus), *overrides,
    ]


def subprocess_env() -> dict:
    # The repository first, then whatever the caller's path has (where megatron-core may be installed).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    # One intra-op thread in every training process, as torchrun gives each of its processes: a run compared with
    # one at another layout then computes with the same kernels. (On a 2-core CPU, bf16 matmuls on two threads
    # reduce in another order than on one: 2.8e-5 apart after three steps, against the 2e-5 of test_launchers.)
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_pretrain(output_dir: Path, corpus: dict, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        pretrain_command(output_dir, corpus, *overrides, resume=resume),
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )


def layer_forward(config, dtype, make_config, device: str, seed: int = 0):
    """One megatron layer of `config`'s model (mixer `model.mixer`) built by `make_config` (transformer_config's
    signature), run forward on a random input [s, b, h] that wants gradients: (layer, input, output)."""
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from kla_megatron.specs import layer_spec
    from pretrain.cpu import cuda_bookkeeping_on_cpu

    torch.manual_seed(seed)
    model = config.model.resolve()
    on_cpu = device == "cpu"
    layer = build_module(layer_spec(model.mixer, model), config=make_config(model, params_dtype=dtype, use_cpu_initialization=on_cpu),
                         layer_number=1).to(device)
    seq, batch = config.data.seq_length, config.training.micro_batch_size
    x = torch.randn(seq, batch, model.hidden_size, dtype=dtype, device=device, requires_grad=True)
    with cuda_bookkeeping_on_cpu():
        rope = None
        if model.mixer == "attention":
            rope = RotaryEmbedding(model.attention_head_dim, rotary_percent=1.0, use_cpu_initialization=on_cpu)(seq)
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
    return layer, x, out
