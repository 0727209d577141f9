"""Atomic, exactly-resumable checkpoints that reshard: a run saved at one TP/PP/DP/CP layout and ZeRO
stage resumes at any other and continues the loss it would have had.

    checkpoints/latest                           name of the newest complete checkpoint
    checkpoints/step_0000050/state/              megatron dist_checkpointing (torch_dist):
        <model key>                                the fp32 master weights, under the model's own keys
                                                   and sharding (a megatron model loader reads them)
        optimizer.state.exp_avg.<model key>        AdamW's moments, sharded like their parameter
        optimizer.state.exp_avg_sq.<model key>
        common state {"optimizer": {"step": n}}    AdamW's step count
    checkpoints/step_0000050/rng/rank_00000.pt   each rank's RNG, restored when the layout is unchanged
    checkpoints/step_0000050/trainer.json        step, consumed samples, lr scheduler, parallel layout

Why it reshards: DeepSpeed keeps the fp32 masters and Adam moments as flat partitions over the
data-parallel ranks, laid out by DP size and ZeRO stage. DeepSpeed's `safe_get_full_*` assembles
each parameter's master and moments as this rank's TP/PP shard of it (an all-reduce over the
data-parallel group per tensor); they are written with the sharding metadata of the model's own
`sharded_state_dict()` (TP splits, the mixer's named in_proj parts, pipeline layer offsets), once
over the data-parallel replicas, the writes spread over them by megatron's fully parallel strategy.
Loading reads this layout's shards and hands them to DeepSpeed with `safe_set_full_*`, which fills
whatever partition this rank now owns. The model weights are set from the fp32 masters, so a
resume loses nothing to bf16 rounding. The data position (consumed samples) is layout-free: every
step reads one global batch whatever the data-parallel size (pretrain/data.py MicroBatches).

Atomic: everything is written under `step_0000050.partial/`; only when every rank has finished does
rank 0 write trainer.json, rename the folder and replace `latest` (write + os.replace), so a kill at
any moment leaves the previous checkpoint or the new one, never half of one.

Asynchronous where it pays: on GPU the state is copied to host memory and a forked process writes
it (megatron's async dist-checkpointing) while training goes on; `Checkpointer.poll`, called every
step, commits a finished write. On CPU (tests, the embedded default) the writer would only compete
with training for the same cores, so saves are synchronous there.

Loading never runs pickled code: the tensors are read with torch.load(weights_only=True) (torch's
default, also for the common state), the RNG files likewise, and torch_dist's `.metadata` pickle
through an unpickler that builds only the checkpoint-metadata classes. No objects are written.
"""

import dataclasses
import enum
import functools
import json
import os
import pickle
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

from pretrain.config import ConfigError
from pretrain.cpu import cuda_bookkeeping_on_cpu

MOMENTS = ("exp_avg", "exp_avg_sq")
"""torch AdamW's per-parameter state besides its step count."""


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


def is_checkpoint(path: Path) -> bool:
    return (path / "state" / "metadata.json").is_file()


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


# ---- what is stored: each parameter's tensors, sharded like the parameter ------------------------


def _parameter_shardings(model: torch.nn.Module) -> dict:
    """The model's sharded tensors (and splitting factories) by state-dict key, each holding a
    trainable parameter. Tied weights appear under both keys; the model marks which one is written."""
    sharded, _extra_states = extract_sharded_tensors_and_factories(model.sharded_state_dict())
    # _extra_states: megatron's per-layer `_extra_state` objects (Transformer Engine's FP8
    # metadata, None here), not written so that loading never unpickles an object.
    params = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    for key, sharding in sharded.items():
        if id(sharding.data) not in params:
            raise ValueError(f"the model checkpoints {key}, which is not a trainable parameter; checkpoint.py saves parameters only")
    covered = {id(sharding.data) for sharding in sharded.values()}
    if uncovered := [name for i, name in params.items() if i not in covered]:
        raise ValueError(f"parameters without a sharded_state_dict entry would not be checkpointed: {uncovered}")
    return sharded


def _holding(sharding, tensor: torch.Tensor, prefix: str = ""):
    """`sharding` with `tensor` in place of the parameter, under `prefix.` + its key when given."""
    if prefix:
        return make_sharded_optimizer_tensor(sharding, tensor, prefix)
    if isinstance(sharding, ShardedTensorFactory):
        return replace(sharding, data=tensor)
    return replace(sharding, data=tensor, dtype=tensor.dtype)


def _moment_prefix(moment: str) -> str:
    return f"optimizer.state.{moment}"  # megatron's own name for optimizer state


def _empty_model_state(model: torch.nn.Module) -> dict:
    """The sharded state to load weights into: fp32 buffers shaped like this rank's parameters."""
    return {
        "model": {key: _holding(s, torch.empty_like(s.data, dtype=torch.float32)) for key, s in _parameter_shardings(model).items()}
    }


def _empty_optimizer_state(model: torch.nn.Module) -> dict:
    """The sharded state to load AdamW's moments into (its step comes with the common state)."""
    shardings = _parameter_shardings(model)
    return {
        "optimizer": {
            m: {key: _holding(s, torch.empty_like(s.data, dtype=torch.float32), _moment_prefix(m)) for key, s in shardings.items()}
            for m in MOMENTS
        }
    }


def _adam(engine) -> torch.optim.Optimizer:
    """torch AdamW inside DeepSpeed's ZeRO or BF16 optimizer; its parameters are the flat fp32
    partitions this data-parallel rank owns."""
    adam = engine.optimizer.optimizer
    if not isinstance(adam, torch.optim.AdamW):
        raise TypeError(f"checkpoint.py stores AdamW's state; the optimizer is {type(adam).__name__}")
    return adam


def _adam_step(adam: torch.optim.Optimizer) -> int:
    steps = {int(s["step"]) for s in adam.state.values()}
    if len(steps) != 1:
        raise RuntimeError(f"AdamW's partitions disagree on the step count: {sorted(steps)}")
    return steps.pop()


def _ensure_adam_state(engine) -> None:
    """AdamW's state for every partition (created as torch creates it, zero moments at step 0, when
    no step has run yet), linked to each parameter's fragment so that safe_*_optimizer_state reach it."""
    adam = _adam(engine)
    if not adam.state:
        state_dict = adam.state_dict()
        partitions = [p for group in adam.param_groups for p in group["params"]]
        state_dict["state"] = {
            i: {"step": torch.tensor(0.0), **{m: torch.zeros_like(p) for m in MOMENTS}} for i, p in enumerate(partitions)
        }
        adam.load_state_dict(state_dict)
    # DeepSpeed links the fragments itself after its first step, but its ZeRO-1/2 optimizer does so
    # after stepping the first parameter group only, so the other groups' parameters never reach
    # their moments (deepspeed 0.19.8, DeepSpeedZeroOptimizer._optimizer_step). Linking is idempotent.
    optimizer = engine.optimizer
    lp_groups = optimizer.bf16_groups if hasattr(optimizer, "bf16_groups") else optimizer.bit16_groups
    for lp_params, group in zip(lp_groups, adam.param_groups, strict=True):
        (partition,) = group["params"]
        lazy_init_hp_params_optimizer_state(lp_params, partition, adam.state)


def _gathered_state(engine) -> dict:
    """The sharded state of this rank's TP/PP shard of the fp32 masters and moments. Collective over
    the data-parallel group: every rank runs the same all-reduces in the same order."""
    _ensure_adam_state(engine)
    state = {"model": {}, "optimizer": {m: {} for m in MOMENTS}}
    state["optimizer"]["step"] = _adam_step(_adam(engine))
    gathered = {}
    for key, sharding in _parameter_shardings(engine.module).items():
        param = sharding.data
        if id(param) not in gathered:
            gathered[id(param)] = {None: safe_get_full_fp32_param(param)}
            gathered[id(param)].update({m: safe_get_full_optimizer_state(param, m) for m in MOMENTS})
        tensors = gathered[id(param)]
        state["model"][key] = _holding(sharding, tensors[None])
        for m in MOMENTS:
            state["optimizer"][m][key] = _holding(sharding, tensors[m], _moment_prefix(m))
    return state


# ---- loading without unpickling code -----------------------------------------------------------

_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


class _MetadataUnpickler(pickle.Unpickler):
    """torch_dist's `.metadata` is a pickle; this builds the checkpoint-metadata dataclasses and
    enums, torch.Size, dtypes and layouts from it, and refuses everything else."""

    def find_class(self, module, name):
        if module in _METADATA_MODULES:
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds")


@contextmanager
def _metadata_read_safely():
    restricted = SimpleNamespace(load=lambda file: _MetadataUnpickler(file).load())
    with mock.patch.object(dcp_filesystem, "pickle", restricted):
        yield


def _load(directory: Path, request: dict, remedy: str = "") -> dict:
    """Collective: `request` (sharded tensors holding empty buffers) filled from `directory`; each
    rank reads the shards it needs. Tensors the checkpoint lacks stop every rank, named, first."""
    with _metadata_read_safely():
        stored = dist_checkpointing.load_tensors_metadata(str(directory)).keys()
    needed = set()
    for sharded in nested_values(request):
        built = sharded.build() if isinstance(sharded, ShardedTensorFactory) else [sharded]
        needed.update(tensor.key for tensor in nested_values(built))
    everywhere = [None] * dist.get_world_size()
    dist.all_gather_object(everywhere, sorted(needed - stored))
    if absent := sorted(set().union(*everywhere)):
        shown = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise ConfigError(f"{directory} lacks {len(absent)} tensor(s) that this run needs: {shown}{remedy}")
    with cuda_bookkeeping_on_cpu(), _metadata_read_safely():
        return dist_checkpointing.load(request, str(directory))


def load_model(path: Path, model: torch.nn.Module) -> None:
    """Collective: the weights of checkpoint `path` (its fp32 masters, cast to the model's dtype)
    into a bare model of any TP/PP layout, e.g. to start a new run from another run's weights."""
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a checkpoint of this program (no state/metadata.json)")
    masters = _load(path / "state", _empty_model_state(model))["model"]
    with torch.no_grad():
        for key, sharding in _parameter_shardings(model).items():
            sharding.data.copy_(masters[key])


def save_model(path: Path, model: torch.nn.Module) -> None:
    """Collective: a weights-only checkpoint in `path` (state/: the model's weights as fp32 masters, no optimizer
    state), which load_model and checkpoint.init_from read at any layout; the Hugging Face import writes one."""
    state = {"model": {key: _holding(s, s.data.float()) for key, s in _parameter_shardings(model).items()}}
    if dist.get_rank() == 0:
        (path / "state").mkdir(parents=True)
    dist.barrier()
    with cuda_bookkeeping_on_cpu():
        dist_checkpointing.save(state, str(path / "state"))


def load_training_state(path: Path, engine, load_optimizer: bool, layout: dict) -> dict:
    """Collective: into a DeepSpeed engine of any layout and ZeRO stage (before its first step), the
    fp32 masters of checkpoint `path` (the model's weights set from them), with `load_optimizer`
    AdamW's moments and step (else AdamW starts afresh), and at an unchanged layout the RNG. Returns
    the trainer state (step, data position, schedule)."""
    trainer_state = json.loads((path / "trainer.json").read_text())
    masters = _load(path / "state", _empty_model_state(engine.module))["model"]
    shardings = _parameter_shardings(engine.module)
    with torch.no_grad():
        for key, sharding in shardings.items():
            safe_set_full_fp32_param(sharding.data, masters[key])
            sharding.data.copy_(masters[key])
    if load_optimizer:
        fresh = "; set checkpoint.load_optimizer=false to resume from its weights with a fresh optimizer"
        optimizer = _load(path / "state", _empty_optimizer_state(engine.module), fresh)["optimizer"]
        if "step" not in optimizer:
            raise ConfigError(f"{path / 'state'} lacks AdamW's step count{fresh}")
        _ensure_adam_state(engine)
        for partition_state in _adam(engine).state.values():
            partition_state["step"].fill_(optimizer["step"])
        for key, sharding in shardings.items():
            for m in MOMENTS:
                safe_set_full_optimizer_state(sharding.data, optimizer[m][key], m)
    rng = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if trainer_state["layout"] == layout and rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return trainer_state


# ---- saving ------------------------------------------------------------------------------------


class Checkpointer:
    """Saves checkpoints under `root`, keeping the newest `keep`. Every rank calls every method.

    `save` starts a checkpoint; it becomes `latest` once every rank has written it: at once when
    synchronous, else at a later `poll` (call it after every step) or `wait` (call it before exiting).
    """

    def __init__(self, root: Path, keep: int, asynchronous: Optional[bool] = None):
        self.root = root
        self.keep = keep
        self.asynchronous = torch.cuda.is_available() if asynchronous is None else asynchronous
        # megatron's async writer returns its results through one queue per process, so one save
        # (one dist_checkpointing.save) is in flight at a time.
        self._queue = AsyncCallsQueue() if self.asynchronous else None

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        """Writes the checkpoint of `step`; returns the path it has once committed."""
        self.wait()
        started = time.perf_counter()
        final = self.root / _step_name(step)
        writing = self.root / (_step_name(step) + ".partial")
        if dist.get_rank() == 0:
            shutil.rmtree(writing, ignore_errors=True)  # left by a run killed while saving
            (writing / "state").mkdir(parents=True)
            (writing / "rng").mkdir()
        dist.barrier()
        torch.save(_rng_state(), writing / "rng" / f"rank_{dist.get_rank():05d}.pt")
        strategy = get_default_save_sharded_strategy()
        data_parallel = engine.seq_data_parallel_group  # the group ZeRO partitions over (data x context)
        if dist.get_world_size(data_parallel) > 1:  # each replica's writes spread over its data-parallel ranks
            strategy = FullyParallelSaveStrategyWrapper(strategy, data_parallel)
        with cuda_bookkeeping_on_cpu():
            request = dist_checkpointing.save(
                _gathered_state(engine), str(writing / "state"), strategy, async_sharded_save=self.asynchronous
            )
        commit = functools.partial(self._commit, writing, final, trainer_state, started)
        if not self.asynchronous:
            commit()
            return final
        request.add_finalize_fn(commit)
        with cuda_bookkeeping_on_cpu():
            self._queue.schedule_async_request(request)
        if dist.get_rank() == 0:
            print(f"checkpoint {final.name}: training paused {time.perf_counter() - started:.2f} s, writing in the background", flush=True)
        return final

    def poll(self) -> None:
        """Commits the save in flight if every rank has written it; does not wait."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Waits for the save in flight, if any, and commits it."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            with cuda_bookkeeping_on_cpu():
                self._queue.maybe_finalize_async_calls(blocking=blocking)

    def _commit(self, written: Path, final: Path, trainer_state: dict, started: float) -> None:
        if dist.get_rank() == 0:
            (written / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
            _fsync_tree(written)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(written, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(final.name + "\n")
            os.replace(tmp, self.root / "latest")
            _prune(self.root, self.keep)
            print(f"saved checkpoint {final} ({time.perf_counter() - started:.2f} s)", flush=True)
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
