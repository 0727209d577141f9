"""pretrain.estimate against what is really there.

* Parameters: the count per rank equals megatron's model, for every mixer and tied embeddings.
* Activations: per layer and token, the estimate equals the bytes autograd keeps for the backward,
  read off the graph of one megatron layer (KLA and GDN on the Triton kernels, in bf16 and fp32, states
  kept or not; attention with RoPE), tensors counted once per storage, parameters left out.
* A whole training run on CPU (ZeRO-1, 2 micro-batches, Triton kernels) under a tracker of every live
  tensor: the tracked peak matches the estimate.
* The GPU measurements committed in bench/results (kla-0.4b on an H200, states kept and recomputed).
* The trainer's refusal, parallel.data, the command line and the step time from a measurement.
"""

import contextlib
import dataclasses
import json
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from pretrain.config import ConfigError, load_config
from pretrain.estimate import GIB, Layout, estimate, layer_terms, stage_parameters, check_fits, usable_bytes
from pretrain_testing import ROOT, corpus_overrides, free_port, subprocess_env

TINY = str(ROOT / "configs" / "tiny.toml")


@pytest.fixture
def single_process_world(monkeypatch):
    """A gloo process group of one and megatron's parallel state, for building modules."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def tiny_config(*overrides):
    return load_config(TINY, list(overrides))


# -- parameters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [[], ["model.mixer=gdn"], ["model.mixer=attention"], ["model.attention_every=2"],
                                       ["model.tie_embeddings=true"]])
def test_parameter_count_is_the_models(single_process_world, overrides):
    from kla_megatron import build_model, transformer_config
    from kla_megatron.model import padded_vocab_size

    model = tiny_config(*overrides).model.resolve()
    built = build_model(model, transformer_config(model, use_cpu_initialization=True), 600, 64)
    assert sum(p.numel() for p in built.parameters()) == stage_parameters(model, padded_vocab_size(600, 1), 1, 1, 0)


# -- activations per layer -------------------------------------------------------------------------------

def saved_bytes(output: torch.Tensor, parameters) -> int:
    """Bytes of every tensor the autograd graph behind `output` keeps, each storage once, parameters left out."""
    storages, seen = {}, set()
    skip = {p.untyped_storage()._cdata for p in parameters}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in skip:
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()

    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    keep(t)
        for t in getattr(node, "saved_tensors", ()) if hasattr(node, "_forward_cls") else ():
            keep(t)
        stack += [n for n, _ in node.next_functions]
    return sum(storages.values())


@contextlib.contextmanager
def attention_without_dropout_rng():
    """Megatron forks a CUDA RNG state around attention dropout (0 here); a CPU run has none to fork."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    fork, tracker.fork = tracker.fork, lambda *a, **k: contextlib.nullcontext()
    try:
        yield
    finally:
        tracker.fork = fork


@pytest.mark.parametrize(
    "mixer, dtype, keep_states",
    [("kla", torch.bfloat16, True), ("kla", torch.bfloat16, False), ("kla", torch.float32, True),
     ("gdn", torch.bfloat16, True), ("attention", torch.bfloat16, True), ("attention", torch.float32, True)],
)
def test_layer_activations_are_what_autograd_keeps(single_process_world, mixer, dtype, keep_states):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from kla_megatron.config import transformer_config
    from kla_megatron.specs import layer_spec
    from pretrain.cpu import cuda_bookkeeping_on_cpu

    config = tiny_config(f"model.mixer={mixer}", "model.kernel_backend=triton", f"model.kernel_keep_states={str(keep_states).lower()}",
                         "data.seq_length=128", "training.micro_batch_size=2")
    model = config.model.resolve()
    layer = build_module(layer_spec(mixer, model), config=transformer_config(model, params_dtype=dtype, use_cpu_initialization=True),
                         layer_number=1)
    seq, batch = config.data.seq_length, config.training.micro_batch_size
    x = torch.randn(seq, batch, model.hidden_size, dtype=dtype, requires_grad=True)
    with cuda_bookkeeping_on_cpu(), attention_without_dropout_rng():
        rope = RotaryEmbedding(model.attention_head_dim, rotary_percent=1.0, use_cpu_initialization=True)(seq) if mixer == "attention" else None
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)
    measured = saved_bytes(out, layer.parameters()) / (seq * batch)
    layout = Layout.of(config, 1, bf16=dtype == torch.bfloat16)
    estimated = sum(layer_terms(model, mixer, layout).values())
    # What the estimate leaves out: fp32 copies of the norm weights (per layer, not per token) and the
    # causal mask (s x s booleans, one for the whole model). Measured at this tiny width: KLA and GDN
    # layers within 0.06%, attention within 0.6% (64 of its 11,212 bytes a token are the mask).
    assert abs(estimated - measured) <= 1e-2 * measured, (estimated, measured)


# -- a whole training step on CPU, every live tensor tracked ----------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of all tensor storages alive, and their peak: every storage an operator returns is counted
    until it is freed (a weakref finaliser on the storage)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _freed(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in self.live:
                    self.live[storage._cdata] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, storage._cdata)
        return out


def test_tracked_training_peak_matches_the_estimate(tmp_path, tiny_corpus, monkeypatch):
    from pretrain import checkpoint, train

    config = load_config(TINY, [f'output_dir="{tmp_path}"', *corpus_overrides(tiny_corpus), "model.kernel_backend=triton",
                                "data.seq_length=256", "training.micro_batch_size=2", "training.global_batch_size=4",
                                "training.steps=2", "training.warmup_steps=0", "eval.interval=0", "logging.tensorboard=false"])
    save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: _untracked(save, *a, **k))  # its writer forks a Manager
    tracker = LiveTensorBytes()
    with tracker:
        train.run(config, resume=False)
    expected = estimate(config, 1, 600, bf16=False).worst
    # Both sides hold DeepSpeed's reduce bucket (5e8 fp32 elements, 2 GB); compare what is left.
    ours, tracked = expected.training - expected.reduce_bucket, tracker.peak - expected.reduce_bucket
    print(f"tracked peak {tracked / 2**20:.2f} MiB, estimated {ours / 2**20:.2f} MiB (without the bucket)")
    assert abs(ours - tracked) <= 0.05 * tracked, (ours / 2**20, tracked / 2**20)


def _untracked(function, *args, **kwargs):
    with _disable_current_modes():
        return function(*args, **kwargs)


# -- the GPU measurements in bench/results --------------------------------------------------------------

@pytest.mark.parametrize("result", ["pretrain_kla-0.4b_h200_triton.json", "pretrain_kla-0.4b_h200_triton-recompute.json"])
def test_estimate_reproduces_the_measured_h200_peaks(result):
    from pretrain.config import _section_from_dict, TrainConfig
    from pretrain.metrics import model_flops_per_token

    run = json.loads((ROOT / "bench" / "results" / result).read_text())
    config = _section_from_dict(TrainConfig, run["config"], "")
    # The run's vocabulary is not in its JSON; its FLOP count says it was the default corpus's 8192.
    flops = run["tflops_per_gpu"] * 1e12 / run["tokens_per_s"]
    assert abs(flops / model_flops_per_token(config.model.resolve(), 8192, config.data.seq_length) - 1) < 1e-3
    predicted = estimate(config, 1, 8192).peak / GIB
    assert abs(predicted / run["peak_memory_gib"] - 1) < 0.02, (predicted, run["peak_memory_gib"])


# -- refusals, layouts, command line ------------------------------------------------------------------

def test_a_layout_that_cannot_fit_is_refused_with_the_fix():
    config = load_config(str(ROOT / "configs" / "kla_7b.toml"), ["parallel.tensor=1", "parallel.sequence_parallel=false"])
    with pytest.raises(ConfigError) as error:
        check_fits(config, 64, 32000, 81559 * 2**20, "NVIDIA H100 80GB HBM3")
    message = str(error.value)
    assert "this layout needs about" in message and "NVIDIA H100 80GB HBM3 has 79.6 GiB" in message
    assert "parallel.force_layout=true" in message and "more parallel.tensor" in message
    check_fits(load_config(str(ROOT / "configs" / "kla_7b.toml")), 64, 32000, 81559 * 2**20)


@pytest.mark.parametrize("name, nodes", [("kla_0.4b", 1), ("kla_0.4b_long", 1), ("kla_1.3b", 2), ("kla_2.7b", 4), ("kla_7b", 8)])
def test_ready_configs_fit_80gb_and_141gb_gpus(name, nodes):
    from pretrain.preflight import nodes_for

    config = load_config(str(ROOT / "configs" / f"{name}.toml"))
    assert nodes_for(config, 8) == (nodes, 8)
    peak = estimate(config, nodes * 8, 32000).peak
    assert peak <= usable_bytes(81559 * 2**20), peak / GIB


def test_estimate_check_runs_fit_their_gpus():
    sys.path.insert(0, str(ROOT / "bench"))
    from estimate_check import RUNS, STEPS

    for gpus, path, overrides in RUNS:
        config = load_config(str(ROOT / path), [*STEPS, *overrides])
        assert estimate(config, gpus, 32000).peak <= usable_bytes(143771 * 2**20), (path, overrides)


def test_parallel_data_must_match_the_process_count(tmp_path, tiny_corpus):
    from pretrain.train import check_config

    config = tiny_config(f'output_dir="{tmp_path}"', *corpus_overrides(tiny_corpus), "parallel.data=2")
    with pytest.raises(ConfigError, match=r"1 process\(es\) give data-parallel size 1, but the layout is tensor=1 x "
                                          r"pipeline=1 x context=1 x data=2 = 2 GPUs; launch that many"):
        check_config(config, 1)
    check_config(config, 2)


@pytest.mark.gpu
def test_the_trainer_refuses_a_layout_this_gpu_cannot_hold(tmp_path, tiny_corpus):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pretrain.train import check_config

    big = [f'output_dir="{tmp_path}"', *corpus_overrides(tiny_corpus), "model.name=kla-7b", "data.seq_length=4096",
           "training.micro_batch_size=4", "training.global_batch_size=4"]
    with pytest.raises(ConfigError, match="this layout needs about"):
        check_config(tiny_config(*big), 1)
    check_config(tiny_config(*big, "parallel.force_layout=true"), 1)


def test_command_line_report_and_step_time():
    run = subprocess.run([sys.executable, "-m", "pretrain.estimate", "--config", "configs/kla_0.4b.toml", "--gpus", "1",
                          "--vocab-size", "8192", "training.global_batch_size=8", "parallel.data=0"],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "peak (torch.cuda.max_memory_allocated)" in run.stdout and "on 80 GB GPUs" in run.stdout
    # 8 x 4096 tokens a step at the 66,051 tokens/s measured in bench/results on one H200
    assert "step time: about 0.50 s (66,051 tokens/s)" in run.stdout, run.stdout
    refused = subprocess.run([sys.executable, "-m", "pretrain.estimate", "--config", "configs/kla_7b.toml", "--gpu-memory", "40"],
                             cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: this layout needs about")


def test_layout_of_a_config():
    layout = Layout.of(load_config(str(ROOT / "configs" / "kla_7b.toml")), 64)
    assert (layout.data, layout.zero_shards, layout.num_microbatches, layout.tokens) == (32, 32, 32, 4096)
    assert dataclasses.replace(layout, context=2).tokens == 2048
