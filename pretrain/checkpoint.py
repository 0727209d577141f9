"""Atomic, exactly-resumable checkpoints.

    checkpoints/latest                     name of the newest complete checkpoint
    checkpoints/step_0000050/model/        megatron dist_checkpointing (reshards over TP/PP)
    checkpoints/step_0000050/ranks/rank_00000.pt   this rank's ZeRO optimizer partition and RNG
    checkpoints/step_0000050/trainer.json  step, consumed samples, lr scheduler, parallel layout

Everything is written under `step_0000050.partial/`; only when every rank has finished does rank 0
rename it and then replace `latest` (write + os.replace), so a kill at any moment leaves either the
previous checkpoint or the new one, never half of one. Loading uses `weights_only=True`.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from megatron.core import dist_checkpointing, tensor_parallel

from pretrain.config import ConfigError
from pretrain.cpu import cuda_bookkeeping_on_cpu

# The only non-tensor objects a ZeRO optimizer state holds; allowed explicitly for weights_only loads.
_SAFE_OPTIMIZER_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


def _step_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    latest = root / "latest"
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    return path if path.is_dir() else None


def read_trainer_state(path: Path) -> dict:
    """A complete checkpoint's trainer.json (step, data position, schedule, layout, model), readable
    before any process group exists."""
    return json.loads((path / "trainer.json").read_text())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save(root: Path, step: int, engine, trainer_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    rank = dist.get_rank()
    final = root / _step_name(step)
    partial = root / (_step_name(step) + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        (partial / "ranks").mkdir(parents=True)
        (partial / "model").mkdir()
    dist.barrier()
    with cuda_bookkeeping_on_cpu():
        dist_checkpointing.save(engine.module.sharded_state_dict(), str(partial / "model"))
    torch.save(
        {"optimizer": engine.optimizer.state_dict(), "rng": _rng_state()},
        partial / "ranks" / f"rank_{rank:05d}.pt",
    )
    dist.barrier()
    if rank == 0:
        (partial / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        _fsync_tree(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        tmp = root / "latest.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, root / "latest")
        _prune(root, keep)
    dist.barrier()
    return final


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def load_model(path: Path, model) -> None:
    """Model weights only, resharded to this run's TP/PP layout by dist_checkpointing."""
    if not (path / "model" / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint of this program (no model/metadata.json)")
    with cuda_bookkeeping_on_cpu():
        state = dist_checkpointing.load(model.sharded_state_dict(), str(path / "model"))
    model.load_state_dict(state)


def load_training_state(path: Path, engine, load_optimizer: bool, layout: dict) -> dict:
    """This rank's ZeRO optimizer partition and RNG from `path` (the model is loaded before
    DeepSpeed starts, by load_model); returns the trainer state (step, data position, schedule)."""
    trainer_state = json.loads((path / "trainer.json").read_text())
    if not load_optimizer:
        return trainer_state
    if trainer_state["layout"] != layout:
        raise ConfigError(
            f"{path} was saved with layout {trainer_state['layout']}, this run is {layout}: ZeRO optimizer "
            "partitions only fit the layout that wrote them. Resume with that layout, or set "
            "checkpoint.load_optimizer=false to keep the weights and start a fresh optimizer."
        )
    with torch.serialization.safe_globals(_SAFE_OPTIMIZER_GLOBALS):
        saved = torch.load(path / "ranks" / f"rank_{dist.get_rank():05d}.pt", map_location="cpu", weights_only=True)
    # ZeRO reads entry [dp_rank] of a per-rank list; the other entries are not used for a rigid load.
    data_parallel = layout["world_size"] // (layout["tensor"] * layout["pipeline"])
    engine.optimizer.load_state_dict([saved["optimizer"]] * data_parallel, load_from_fp32_weights=True)
    _set_rng_state(saved["rng"])
    return trainer_state
