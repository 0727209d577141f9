"""Checkpoints reshard: fp32 masters and Adam moments saved at one TP/DP layout and ZeRO stage load at
another bit for bit, and training continues with the loss the uninterrupted run had.

Spawned processes (gloo) train the tiny model with DeepSpeed under megatron's schedule on fixed
global batches, as the training program does. A: TP=2, DP=2, ZeRO-2 (4 processes) trains steps
1-2, saves, and goes on to steps 3-4. B: TP=1, DP=1, ZeRO-1 loads A's checkpoint, saves it again
at its own layout and trains steps 3-4. C: TP=2, DP=2, ZeRO-1 loads B's checkpoint: its masters and
moments must equal A's bit for bit (the round trip through TP=1/DP=1 lost nothing), and B's and C's
losses must be A's. D loads A's checkpoint without the optimizer state: same weights (same step-3
loss), different step 4, which shows the moments are what B and C carried over.
"""

import json
import os
import pickle
import shutil
import signal
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pretrain_testing import free_port
from test_zero import SAMPLES, SEQ, batches, build, start_world


def worker(rank: int, world_size: int, port: int, tensor: int, zero_stage: int, plan: dict, out: str):
    """Runs `plan` at this layout: optionally load a checkpoint (and save it again at once), train
    the given steps (saving after `save_after`), and record losses, grad norms and the fp32 state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from pretrain import checkpoint, zero
    from pretrain.cpu import cuda_bookkeeping_on_cpu
    from pretrain.train import forward_step, mean_loss

    torch.set_num_threads(1)
    groups = start_world(rank, world_size, port, tensor)
    model, tf_config, config = build(zero_stage, tensor_parallel=tensor, seed=plan.get("seed", 0))
    dp, dp_rank = groups.dp.size(), groups.dp.rank()
    engine = zero.initialize(model, config, bf16=False, groups=groups)
    tf_config.no_sync_func = partial(zero.accumulating, engine)
    layout = {"tensor": tensor, "data": dp, "zero_stage": zero_stage}
    checkpointer = checkpoint.Checkpointer(Path(plan["root"]), keep=5, asynchronous=plan.get("asynchronous", False))

    def fp32_state() -> dict:
        return {n: [safe_get_full_fp32_param(p)] + [safe_get_full_optimizer_state(p, m) for m in checkpoint.MOMENTS]
                for n, p in engine.module.named_parameters()}

    result = {"loss": {}, "grad_norm": {}}
    if "load" in plan:
        state = checkpoint.load_training_state(Path(plan["load"]), engine, plan.get("load_optimizer", True), layout)
        result["trainer_state"] = state
        if plan.get("load_optimizer", True):
            result["state"] = fp32_state()
        if "save_again" in plan:
            checkpointer.save(state["step"], engine, {**state, "layout": layout})
    micro = SAMPLES // dp
    for step in plan["steps"]:
        mine = [batches(step - 1)[j * dp + dp_rank] for j in range(micro)]
        with cuda_bookkeeping_on_cpu():
            losses = get_forward_backward_func()(
                forward_step_func=partial(forward_step, engine, groups, False), data_iterator=iter(mine),
                model=list(engine.module.chunks), num_microbatches=micro, seq_length=SEQ, micro_batch_size=1,
                forward_only=False,
            )
        zero.finish_gradients(engine, groups)
        engine.step()
        result["loss"][step] = mean_loss(losses, groups)
        result["grad_norm"][step] = float(engine.get_global_grad_norm())
        checkpointer.poll()
        if step == plan.get("save_after"):
            checkpointer.save(step, engine, {"step": step, "layout": layout})
            result["state"] = fp32_state()
            if plan.get("die_after_save"):  # a kill while the background write may still run
                os.kill(os.getpid(), signal.SIGKILL)
    checkpointer.wait()
    torch.save(result, f"{out}.rank{rank}.pt")


def run(world_size: int, tensor: int, zero_stage: int, plan: dict, out: Path) -> list[dict]:
    mp.start_processes(worker, args=(world_size, free_port(), tensor, zero_stage, plan, str(out)),
                       nprocs=world_size, start_method="spawn")
    return [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(world_size)]


def assert_same_losses(ours: dict, reference: dict, steps) -> None:
    for step in steps:
        # Measured: identical on CPU (TP=2 and TP=1 sum in the same order here); 1e-6 allows for
        # another reduction order.
        assert abs(ours["loss"][step] - reference["loss"][step]) <= 1e-6 * reference["loss"][step], step
        assert abs(ours["grad_norm"][step] - reference["grad_norm"][step]) <= 1e-5 * reference["grad_norm"][step], step


@pytest.mark.slow
def test_reshard_tp2_dp2_zero2_to_tp1_dp1_zero1_and_back(tmp_path):
    a = run(4, 2, 2, {"root": str(tmp_path / "a"), "steps": [1, 2, 3, 4], "save_after": 2}, tmp_path / "A")
    saved = tmp_path / "a" / "step_0000002"
    assert (tmp_path / "a" / "latest").read_text().strip() == saved.name
    assert checkpoint_files(saved) == {"state", "trainer.json", "rng"}
    assert sorted(p.name for p in (saved / "rng").iterdir()) == [f"rank_{r:05d}.pt" for r in range(4)]

    b = run(1, 1, 1, {"root": str(tmp_path / "b"), "steps": [3, 4], "load": str(saved), "save_again": True, "seed": 7}, tmp_path / "B")
    assert b[0]["trainer_state"]["step"] == 2
    assert_same_losses(b[0], a[0], [3, 4])
    # TP-replicated parameters compare directly between the layouts (the TP-split ones by the round trip).
    for name, tensors in b[0]["state"].items():
        if name.endswith("layernorm.weight"):
            for ours, theirs in zip(tensors, a[0]["state"][name]):
                assert torch.equal(ours, theirs), name

    c = run(4, 2, 1, {"root": str(tmp_path / "c"), "steps": [3, 4], "load": str(tmp_path / "b" / "step_0000002"), "seed": 8}, tmp_path / "C")
    for rank in range(4):
        assert c[rank]["state"].keys() == a[rank]["state"].keys()
        for name, tensors in a[rank]["state"].items():
            for what, ours, theirs in zip(("master", "exp_avg", "exp_avg_sq"), c[rank]["state"][name], tensors):
                assert torch.equal(ours, theirs), f"rank {rank}: {what} of {name} changed in the round trip"
    assert_same_losses(c[0], a[0], [3, 4])

    d = run(1, 1, 1, {"root": str(tmp_path / "d"), "steps": [3, 4], "load": str(saved), "load_optimizer": False, "seed": 9}, tmp_path / "D")
    assert abs(d[0]["loss"][3] - a[0]["loss"][3]) <= 1e-6 * a[0]["loss"][3]
    assert abs(d[0]["loss"][4] - a[0]["loss"][4]) > 1e-4 * a[0]["loss"][4], "a fresh AdamW should change step 4"


def checkpoint_files(path: Path) -> set:
    return {p.name for p in path.iterdir()}


def test_async_save_commits_and_a_kill_while_writing_keeps_the_last_checkpoint(tmp_path):
    """megatron's background writer on CPU (as on GPU): the checkpoint of step 1 is committed before
    step 2's save; killing every rank right after step 2's save started leaves step 1 as `latest`,
    and it loads (at another layout) to the state that was saved."""
    plan = {"root": str(tmp_path / "a"), "steps": [1], "save_after": 1, "asynchronous": True}
    first = run(2, 1, 2, plan, tmp_path / "A")
    root = tmp_path / "a"
    assert (root / "latest").read_text().strip() == "step_0000001"
    with pytest.raises(mp.ProcessExitedException):
        run(2, 1, 2, {**plan, "steps": [1, 2], "save_after": 2, "die_after_save": True}, tmp_path / "killed")
    assert (root / "latest").read_text().strip() == "step_0000001"
    loaded = run(1, 1, 1, {"root": str(tmp_path / "b"), "steps": [], "load": str(root / "step_0000001")}, tmp_path / "B")
    for name, tensors in first[0]["state"].items():
        for ours, theirs in zip(loaded[0]["state"][name], tensors):
            assert torch.equal(ours, theirs), name


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoints_worker(rank: int, port: int, directory: str, out: str):
    from megatron.core import dist_checkpointing

    from pretrain import checkpoint, zero
    from pretrain.config import ConfigError
    from pretrain.cpu import cuda_bookkeeping_on_cpu

    groups = start_world(0, 1, port)
    model, _, config = build(1)
    engine = zero.initialize(model, config, bf16=False, groups=groups)
    layout = {"tensor": 1}
    messages = {}

    # Weights without optimizer state: a plain megatron model checkpoint (e.g. converted weights).
    weights_only = Path(directory) / "weights_only"
    (weights_only / "state").mkdir(parents=True)
    with cuda_bookkeeping_on_cpu():
        dist_checkpointing.save(model.sharded_state_dict(), str(weights_only / "state"))
    (weights_only / "trainer.json").write_text(json.dumps({"step": 5, "layout": layout}))
    try:
        checkpoint.load_training_state(weights_only, engine, True, layout)
    except ConfigError as e:
        messages["no_optimizer"] = str(e)
    checkpoint.load_training_state(weights_only, engine, False, layout)  # weights only: fine

    # A torch_dist .metadata whose pickle would run code.
    poisoned = Path(directory) / "poisoned"
    shutil.copytree(weights_only, poisoned)
    marker = Path(directory) / "code_ran"
    (poisoned / "state" / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    try:
        checkpoint.load_model(poisoned, model)
    except pickle.UnpicklingError as e:
        messages["poisoned"] = str(e)
    messages["code_ran"] = marker.exists()
    Path(out).write_text(json.dumps(messages))


def test_missing_optimizer_state_is_named_and_metadata_never_runs_code(tmp_path):
    mp.start_processes(bad_checkpoints_worker, args=(free_port(), str(tmp_path), str(tmp_path / "out.json")), nprocs=1, start_method="spawn")
    messages = json.loads((tmp_path / "out.json").read_text())
    assert "optimizer.state.exp_avg." in messages["no_optimizer"], messages
    assert "checkpoint.load_optimizer=false" in messages["no_optimizer"], messages
    assert "builtins.open" in messages["poisoned"] or "io.open" in messages["poisoned"], messages
    assert messages["code_ran"] is False
