"""The exported model on a GPU, where the shipped copies of our Triton kernels run (chunk_kla, fused_recurrent_kla,
causal_conv1d, rms_norm): the megatron model's logits (fp32, on the GPU too), decoding with the cache equal to one
pass, and generate() equal to the CPU's; fp32 and bf16 exports, at the tiny shape and at the 0.4B model's head shape;
one-token steps replayed as CUDA graphs equal to the eager ones."""

import dataclasses

import pytest
import torch

from export_testing import model_configs, tokens, write_run
from kla_model_testing import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# fp32: the same Triton kernels in both, but another order of products (megatron's linear layers, [s, b] layout).
FP32_TOL = 1e-4
# bf16 weights and activations against the fp32 megatron model.
BF16_TOL = 3e-2


def _models():
    from kla_megatron import named_model

    models = {name: model_configs()[name] for name in ("kla", "hybrid", "gdn")}
    models["kla-0.4b-2-layers"] = dataclasses.replace(named_model("kla-0.4b"), num_layers=2)
    return models


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """name -> ({dtype: folder}, the fp32 megatron model's logits)."""
    from kla_megatron.export_hf import export

    root = tmp_path_factory.mktemp("gpu")
    result = {}
    for seed, (name, config) in enumerate(_models().items()):
        logits = write_run(root / name, config, tokenizer, seed=seed + 1)
        folders = {}
        for dtype in ("fp32", "bf16"):
            folders[dtype] = root / f"{name}-{dtype}"
            export(root / name / "checkpoints", folders[dtype], dtype=dtype)
        result[name] = (folders, logits)
    return result


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).cuda().eval()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(_models()))
def test_gpu_logits_and_decoding(exported, name, dtype):
    folders, reference = exported[name]
    model = _load(folders[dtype])
    tol = FP32_TOL if dtype == "fp32" else BF16_TOL
    ids = tokens().cuda()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        err = rel_err(full.float().cpu(), reference)
        assert err < tol, f"{name} {dtype}: logits vs the megatron model, rel err {err:.2e}"
        out = model(ids[:, :9], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(9, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    err = rel_err(torch.cat(steps, dim=1).float(), full.float())
    assert err < tol, f"{name} {dtype}: decoding with the cache vs one pass, rel err {err:.2e}"


@pytest.mark.parametrize("name", ["kla", "hybrid"])
def test_gpu_generate_equals_the_cpu(exported, name):
    """Greedy continuation of a left-padded batch: the same tokens on the GPU (Triton) as on the CPU (PyTorch)."""
    from transformers import AutoModelForCausalLM

    folder = exported[name][0]["fp32"]
    prompt = torch.stack([tokens(1, 7, seed=8)[0], torch.cat([torch.full((3,), 3), tokens(1, 4, seed=9)[0]])])
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cpu = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    on_cpu = cpu.generate(input_ids=prompt, attention_mask=mask, **options)
    on_gpu = _load(folder).generate(input_ids=prompt.cuda(), attention_mask=mask.cuda(), **options)
    assert torch.equal(on_gpu.cpu(), on_cpu)


def _decode_in_turns(model, graphs: bool):
    """Two caches of batch 2 taking turns, one of batch 1 between them, then a beam-search reorder: every step's
    logits and each cache's final states."""
    model.config.decode_cuda_graphs = graphs
    model.decode_graphs = type(model.decode_graphs)()  # the shipped module's DecodeGraphs, none captured yet
    ids = tokens(2, 16, seed=3).cuda()
    logits = []
    with torch.no_grad():
        caches = [model(prompt, use_cache=True).past_key_values for prompt in (ids[:, :8], ids.flip(0)[:, :6], ids[:1, :5])]
        for t in range(8, 12):
            for cache, step in zip(caches, (ids[:, t:t + 1], ids.flip(0)[:, t:t + 1], ids[:1, t:t + 1])):
                logits.append(model(step, past_key_values=cache).logits)
        caches[0].reorder_cache(torch.tensor([1, 0], device="cuda"))
        for t in range(12, 16):
            logits.append(model(ids[:, t:t + 1], past_key_values=caches[0]).logits)
    states = [torch.cat([s.recurrent.flatten() for s in cache.layers]) for cache in caches]
    return logits, states


@pytest.mark.parametrize("name", ["kla", "gdn"])
def test_gpu_graphed_decoding_equals_eager(exported, name):
    """One-token steps replayed as CUDA graphs (DecodeGraphs) give the eager steps' logits and states, with two
    caches taking turns through one graph (each keeps its own states), a second batch size, and a reorder."""
    model = _load(exported[name][0]["fp32"])
    eager_logits, eager_states = _decode_in_turns(model, graphs=False)
    assert not model.decode_graphs.graphs
    graphed_logits, graphed_states = _decode_in_turns(model, graphs=True)
    assert len(model.decode_graphs.graphs) == 2  # batch 2 and batch 1: the steps did replay graphs
    for step, (graphed, eager) in enumerate(zip(graphed_logits, eager_logits)):
        err = rel_err(graphed.float(), eager.float())
        assert err < 1e-6, f"{name}: step {step}, graphed vs eager logits, rel err {err:.2e}"
    for graphed, eager in zip(graphed_states, eager_states):
        assert rel_err(graphed, eager) < 1e-6
