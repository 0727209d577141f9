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
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_pretrain(output_dir: Path, corpus: dict, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        pretrain_command(output_dir, corpus, *overrides, resume=resume),
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
