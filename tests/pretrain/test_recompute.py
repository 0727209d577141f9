"""Selective activation recompute (training.recompute_modules=["mlp"]) trains the same model in less memory.

* CPU: one layer under megatron's MLP recompute gives the output and every gradient of the layer without it,
  bit for bit (KLA and attention layers); megatron's norm recompute ("layernorm") fails without Transformer
  Engine, which is why it is not offered.
* GPU (`-m gpu`): a few training steps of a narrow 16-layer model give the losses of the run without recompute
  (fp32 and bf16), and the peak memory falls by what pretrain.estimate says.
"""

import functools
import importlib.util
import json
import subprocess

import pytest
import torch
from megatron.core.transformer.mlp import MLP

from kla_megatron.config import transformer_config
from pretrain.config import load_config
from pretrain.estimate import estimate, with_recompute
from pretrain_testing import ROOT, layer_forward, pretrain_command, subprocess_env

TINY = str(ROOT / "configs" / "tiny.toml")


@pytest.mark.parametrize("mixer", ["kla", "attention"])
def test_mlp_recompute_gives_the_same_layer(single_process_world, megatron_rng_on_cpu, mixer):
    config = load_config(TINY, [f"model.mixer={mixer}", "model.kernel_backend=torch", "data.seq_length=64",
                                "training.micro_batch_size=2"])
    results, mlp_calls = [], []
    count = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: mlp_calls.append(1) if isinstance(module, MLP) else None)
    try:
        for make_config in (transformer_config, functools.partial(transformer_config, recompute_modules=("mlp",))):
            mlp_calls.clear()
            layer, x, out = layer_forward(config, torch.float32, make_config, "cpu")
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
            results.append([len(mlp_calls), out, x.grad] + [p.grad for p in layer.parameters()])
    finally:
        count.remove()
    (plain_calls, plain, *plain_grads), (recomputed_calls, recomputed, *recomputed_grads) = results
    assert (plain_calls, recomputed_calls) == (1, 2)  # the backward rebuilt the MLP
    assert torch.equal(plain, recomputed)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, recomputed_grads))


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine is installed")
def test_megatron_norm_recompute_needs_transformer_engine(single_process_world, megatron_rng_on_cpu):
    """megatron-core's CheckpointWithoutOutput() sets fp8 = (False is not None) and takes its Transformer Engine
    path: if this stops failing, "layernorm" can be offered (kla_megatron.config.RECOMPUTE_MODULES_NOT_OFFERED)."""
    config = load_config(TINY, ["model.kernel_backend=torch", "data.seq_length=64", "training.micro_batch_size=2"])
    with pytest.raises(NameError, match="FP8GlobalStateManager"):
        layer_forward(config, torch.float32, functools.partial(transformer_config, recompute_modules=("layernorm",)), "cpu")


# 16 narrow layers, 8K tokens a micro-batch: activations dominate the peak, and the one layer whose MLP is rebuilt
# at a time in the backward is 1/16 of what recompute saves.
GPU_RUN = ["model.num_layers=16", "data.seq_length=2048", "training.micro_batch_size=4", "training.global_batch_size=8",
           "training.steps=4", "training.warmup_steps=1", "checkpoint.interval=0", "eval.interval=0"]


def peak_memory_bytes(output_dir) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tb"))
    events.Reload()
    return max(e.value for e in events.Scalars("perf/peak_memory_gib")) * 2**30


@pytest.mark.gpu
@pytest.mark.parametrize("precision, loss_tolerance", [("fp32", 1e-6), ("bf16", 1e-4)])
def test_mlp_recompute_trains_the_same_in_less_memory(tmp_path, tiny_corpus, precision, loss_tolerance):
    """Both runs at once on the one GPU (each process's peak is its own). The losses: megatron's recompute runs
    the same kernels on the same inputs (bit-identical on CPU), so they should agree to the last bit; the
    tolerances leave room for rounding, and the measured difference is printed. The memory, in bf16: the saving is
    the estimate's, (L - 1) x the MLP's activations, within 10% (if the peak falls where the rebuilt MLP does not
    exist yet, the saving is L / (L - 1) = 7% more)."""
    cases = {"plain": [], "mlp": ["mlp"]}
    commands = {name: pretrain_command(tmp_path / name, tiny_corpus, *GPU_RUN, f"training.precision={precision}",
                                       f"training.recompute_modules={json.dumps(modules)}") for name, modules in cases.items()}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in cases}
    runs = {name: subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=logs[name], stderr=subprocess.STDOUT)
            for name, command in commands.items()}
    for name, run in runs.items():
        run.wait(timeout=600)
        logs[name].close()
        assert run.returncode == 0, (name, (tmp_path / f"{name}.log").read_text()[-3000:])
    losses = {name: json.loads(next((tmp_path / name).glob("history_rank*.json")).read_text())["train_loss"] for name in cases}
    assert len(losses["plain"]) == 4 and losses["mlp"].keys() == losses["plain"].keys()
    worst = max(abs(losses["mlp"][s] - loss) / abs(loss) for s, loss in losses["plain"].items())
    peaks = {name: peak_memory_bytes(tmp_path / name) for name in cases}
    estimates = {name: estimate(load_config(TINY, commands[name][5:]), 1, 600).peak for name in cases}
    measured, estimated = peaks["plain"] - peaks["mlp"], estimates["plain"] - estimates["mlp"]
    print(f"{precision}: max relative loss difference {worst:.2e}; peak MiB measured {peaks['plain'] / 2**20:.1f} -> "
          f"{peaks['mlp'] / 2**20:.1f}, estimated {estimates['plain'] / 2**20:.1f} -> {estimates['mlp'] / 2**20:.1f}; "
          f"saving measured {measured / 2**20:.1f}, estimated {estimated / 2**20:.1f}")
    assert worst <= loss_tolerance
    if precision == "bf16":  # the estimate's memory model is checked for bf16 runs (fp32's reduce bucket is not)
        assert abs(measured - estimated) <= 0.1 * estimated
