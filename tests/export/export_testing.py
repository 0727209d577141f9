"""Shared pieces of the export tests: a SentencePiece tokenizer trained on real text as data_prep trains it; runs of
the tiny models as python -m pretrain leaves them (checkpoints/latest, step_N/state, config.json) with the megatron
model's logits on fixed tokens; the same checkpoint resaved at TP = 2 and at PP = 2 by spawned ranks; a Python that
sees none of this project; transformers 4.57.3 (the last 4.x) beside this environment's torch."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
import torch.multiprocessing as mp

from kla_model_testing import free_port

VOCAB = 1000  # the tokenizer's; megatron pads its rows to 1024
SEQ = 24
STEP, TP2_STEP, PP2_STEP = "step_0000001", "step_0000002", "step_0000003"
TRANSFORMERS_4 = "4.57.3"


def model_configs() -> dict:
    """The four kinds of model, at the tiny shape; the GDN one also ties its embeddings."""
    from kla_megatron import named_model

    tiny = named_model("tiny")
    return {
        "kla": tiny,
        "gdn": dataclasses.replace(named_model("tiny-gdn"), tie_embeddings=True),
        "hybrid": dataclasses.replace(tiny, attention_every=2),
        "transformer": dataclasses.replace(tiny, mixer="attention"),
    }


def tokens(batch: int = 2, length: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def real_texts(files: int = 60, chars: int = 20000) -> list:
    """Python source of the standard library: code, docstrings, indentation, the odd non-ASCII character."""
    paths = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:files]
    return [Path(p).read_text(encoding="utf-8", errors="replace")[:chars] for p in paths]


def train_tokenizer(folder: Path, model_type: str = "bpe") -> Path:
    """A tokenizer as `python -m data_prep train-tokenizer` makes it (identity normalisation, byte fallback, ...)."""
    from data_prep.tokenizers import train_sentencepiece

    train_sentencepiece(iter(real_texts(files=30)), str(folder), VOCAB, model_type, threads=2)
    return folder / "tokenizer.model"


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The megatron model's logits over the tokenizer's rows (computed on the GPU where there is one: megatron's RoPE
    moves itself there), on the CPU."""
    from pretrain.cpu import cuda_bookkeeping_on_cpu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad(), cuda_bookkeeping_on_cpu():
        logits = model.to(device)(ids.to(device), positions.to(device), None)[..., :VOCAB].cpu()
    model.cpu()
    return logits


def write_run(run: Path, model_config, tokenizer: Path, seed: int) -> torch.Tensor:
    """A run folder with one checkpoint of random weights (norm weights too) in training's format; returns the megatron
    logits on tokens()."""
    from kla_megatron import build_model, transformer_config
    from kla_megatron.export_hf import one_process_megatron
    from kla_megatron.hf.convert import model_section
    from kla_megatron.init import initialize_weights
    from pretrain import checkpoint

    with one_process_megatron():
        config = transformer_config(model_config, use_cpu_initialization=True)
        model = build_model(model_config, config, VOCAB, SEQ)
        initialize_weights(model, config, seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
        logits = megatron_logits(model, tokens())
        checkpoint.save_model(run / "checkpoints" / STEP, model)
    (run / "checkpoints" / "latest").write_text(STEP + "\n")
    settings = {"model": model_section(model_config), "data": {"tokenizer": str(tokenizer), "seq_length": SEQ}}
    (run / "config.json").write_text(json.dumps(settings))
    return logits


def _reshard_worker(rank: int, world_size: int, port: int, run: str, model_config) -> None:
    """Loads the run's TP = 1 checkpoint and saves it at TP = 2 (TP2_STEP), then at PP = 2 (PP2_STEP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from kla_megatron import build_model, transformer_config
    from pretrain import checkpoint

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    checkpoints = Path(run) / "checkpoints"
    for tensor, pipeline, step in ((2, 1, TP2_STEP), (1, 2, PP2_STEP)):
        parallel_state.initialize_model_parallel(tensor, pipeline)
        config = transformer_config(model_config, tensor_parallel=tensor, pipeline_parallel=pipeline,
                                    use_cpu_initialization=True)
        model = build_model(model_config, config, VOCAB, SEQ)
        checkpoint.load_model(checkpoints / STEP, model)
        checkpoint.save_model(checkpoints / step, model)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def reshard(run: Path, model_config) -> None:
    """Adds TP2_STEP and PP2_STEP, the run's checkpoint as two ranks save it at TP = 2 and at PP = 2."""
    mp.spawn(_reshard_worker, args=(2, free_port(), str(run), model_config), nprocs=2, join=True)


FRESH_PRELUDE = """
import importlib.util, sys
# This project is installed in editable mode: drop its import hook, as on a machine that only has torch and transformers.
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
assert not any(importlib.util.find_spec(m) for m in ("kernels", "kla_megatron", "pretrain", "data_prep")), sys.path
"""


def run_fresh_python(script: str, folder: Path, extra_path: str = None) -> subprocess.CompletedProcess:
    """Runs `script` in a new interpreter, in `folder`, with none of this project importable, no network, no stdin
    and its own transformers module cache; `extra_path` goes first on its path (another transformers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(HF_MODULES_CACHE=str(folder / "hf_modules"), HF_HUB_OFFLINE="1")
    if extra_path:
        env["PYTHONPATH"] = extra_path
    result = subprocess.run([sys.executable, "-c", FRESH_PRELUDE + script], cwd=folder, env=env, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def transformers_4_path() -> str:
    """A folder holding transformers 4.57.3 and the versions of its dependencies that differ from this environment's
    (tokenizers 0.22, huggingface_hub 0.x, requests), for PYTHONPATH beside this environment's torch. Installed by
    pip --target once per machine (about 30 s), into the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = cache / "kla-megatron-tests" / f"transformers-{TRANSFORMERS_4}"
    if not (target / "complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        packages = [f"transformers=={TRANSFORMERS_4}", "tokenizers>=0.22,<0.23", "huggingface_hub>=0.34,<1.0",
                    "requests", "urllib3", "idna", "certifi", "charset_normalizer"]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *packages],
                       check=True, capture_output=True, text=True)
        (target / "complete").touch()
    return str(target)
