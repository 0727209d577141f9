"""The exported folder is the megatron model: the same logits (from checkpoints saved at TP = 1, TP = 2 and PP = 2),
the same logits again when decoding token by token with the cache (also after left padding), generate() as a plain
greedy / sampling loop over one-pass logits, and a bit-exact way back with --from-hf."""

import json

import pytest
import torch

from export_testing import PP2_STEP, SEQ, STEP, TP2_STEP, VOCAB, model_configs, reshard, tokens, write_run
from kla_model_testing import rel_err

# fp32 on the CPU: the export runs the megatron model's own functions (mix, rms_norm) in the same order; measured
# 0.0 (bit-identical logits) for every model on the 2-core CPU machine (2026-11-30).
TOL = 1e-5
# The cache path computes the recurrence token by token (fused_recurrent_kla) where one pass runs it chunkwise, and
# attention over a cache where one pass is causal SDPA: fp32 rounding in another order. Measured <= 5.4e-7 (decoding)
# and <= 5.3e-7 (a left-padded row) on the 2-core CPU machine (2026-11-30).
DECODE_TOL = 1e-5
MODELS = list(model_configs())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """name -> (run folder, exported folder, megatron logits on tokens())."""
    from kla_megatron.export_hf import export

    root = tmp_path_factory.mktemp("runs")
    result = {}
    for seed, (name, config) in enumerate(model_configs().items()):
        logits = write_run(root / name, config, tokenizer, seed=seed + 1)
        export(root / name / "checkpoints", root / f"{name}-hf", dtype="fp32")
        result[name] = (root / name, root / f"{name}-hf", logits)
    return result


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()


@pytest.mark.parametrize("name", MODELS)
def test_exported_logits_equal_the_megatron_model(runs, name):
    _, folder, reference = runs[name]
    model = load(folder)
    assert type(model).__module__.startswith("transformers_modules."), "loaded the project's code, not the export's"
    assert model.dtype == torch.float32 and model.config.vocab_size == VOCAB
    with torch.no_grad():
        out = model(tokens(), output_hidden_states=True)
    err = rel_err(out.logits, reference)
    assert err < TOL, f"{name}: logits rel err {err:.2e}"
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(model.lm_head(out.hidden_states[-1]), out.logits)


def test_tensor_and_pipeline_parallel_checkpoints_export_the_same_model(runs, tmp_path):
    """The hybrid run's checkpoint resaved by two ranks at TP = 2 (heads, qkv and vocabulary rows split) and at
    PP = 2 (one layer a rank) exports to the same weights, hence the same logits, as at TP = 1."""
    from safetensors.torch import load_file

    from kla_megatron.export_hf import export

    run, folder, reference = runs["hybrid"]
    reshard(run, model_configs()["hybrid"])
    expected = load_file(str(folder / "model.safetensors"))
    for step in (TP2_STEP, PP2_STEP):
        export(run / "checkpoints" / step, tmp_path / step, dtype="fp32")
        weights = load_file(str(tmp_path / step / "model.safetensors"))
        assert weights.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(weights[key], tensor), f"{step}: {key} differs from the TP = 1 export"
        with torch.no_grad():
            err = rel_err(load(tmp_path / step)(tokens()).logits, reference)
        assert err < TOL, f"{step}: logits rel err {err:.2e}"


def _past(out):
    return out.past_key_values


@pytest.mark.parametrize("name", MODELS)
def test_decoding_with_the_cache_equals_one_pass(runs, name):
    model = load(runs[name][1])
    ids = tokens(2, 16, seed=5)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)
        steps, cache = [out.logits], _past(out)
        for t in range(5, 16):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = _past(out)
    assert cache.get_seq_length() == 16
    err = rel_err(torch.cat(steps, dim=1), full)
    assert err < DECODE_TOL, f"{name}: prefill 5 + 11 decode steps vs one pass, rel err {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_equals_each_sequence_alone(runs, name):
    """Rows of 12 and 7 tokens, the shorter one left-padded: prefill and 4 decode steps with the cache give each
    row's own logits. Padding enters neither the conv, the recurrent state nor an attention."""
    model = load(runs[name][1])
    long, short = tokens(1, 16, seed=6)[0], tokens(1, 11, seed=7)[0]
    pad = 5
    prompt = torch.stack([long[:12], torch.cat([torch.full((pad,), 3), short[:7]])])
    mask = torch.ones_like(prompt)
    mask[1, :pad] = 0
    with torch.no_grad():
        out = model(prompt, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits], _past(out)
        for t in range(4):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            step = torch.stack([long[12 + t], short[7 + t]])[:, None]
            out = model(step, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = _past(out)
        logits = torch.cat(logits, dim=1)
        alone = [model(long[None]).logits[0], model(short[None]).logits[0]]
    for row, (got, want) in enumerate(((logits[0], alone[0]), (logits[1, pad:], alone[1]))):
        err = rel_err(got, want)
        assert err < DECODE_TOL, f"{name}: row {row} of the padded batch vs alone, rel err {err:.2e}"


def _reference_generation(model, prompt, mask, new_tokens, sample_seed=None):
    """generate()'s contract written as a loop over one-pass logits (no cache): positions count real tokens, EOS is
    suppressed (min_new_tokens), then argmax, or a multinomial draw from the softmax."""
    eos = model.generation_config.eos_token_id
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    ids = prompt
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            scores = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        scores[:, eos] = -float("inf")
        if sample_seed is None:
            chosen = scores.argmax(-1)
        else:
            chosen = torch.multinomial(scores.softmax(-1), 1)[:, 0]
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("name", ["hybrid", "kla"])
def test_generate_greedy_and_sampled(runs, name):
    model = load(runs[name][1])
    prompt = torch.stack([tokens(1, 7, seed=8)[0], torch.cat([torch.full((3,), 3), tokens(1, 4, seed=9)[0]])])
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    new = 6
    greedy = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False)
    assert torch.equal(greedy, _reference_generation(model, prompt, mask, new))
    torch.manual_seed(11)
    sampled = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    assert torch.equal(sampled, _reference_generation(model, prompt, mask, new, sample_seed=11))
    assert not torch.equal(sampled, greedy)


@pytest.mark.parametrize("name", ["hybrid", "gdn"])
def test_export_then_import_round_trips_bit_exact(runs, tmp_path, name):
    """--from-hf gives the training checkpoint back: every weight bit-identical on the tokenizer's rows (the padded
    rows, dropped by the export, come back as zeros), and exporting the imported step gives the same folder."""
    from safetensors.torch import load_file

    from kla_megatron.export_hf import export, import_hf, load_megatron, one_process_megatron

    run, folder, _ = runs[name]
    config = model_configs()[name]
    import_hf(folder, tmp_path / "imported")
    with one_process_megatron():
        original = dict(load_megatron(run / "checkpoints" / STEP, config, SEQ, VOCAB).named_parameters())
        imported = dict(load_megatron(tmp_path / "imported", config, SEQ, VOCAB).named_parameters())
    assert original.keys() == imported.keys()
    for key, param in original.items():
        if param.shape[0] == 1024:  # vocabulary rows
            assert torch.equal(imported[key][:VOCAB], param[:VOCAB]), key
            assert not imported[key][VOCAB:].any(), key
        else:
            assert torch.equal(imported[key], param), key
    export(tmp_path / "imported", tmp_path / "again")
    first, again = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "modeling_kla.py", "mixer_math.py"):
        assert (folder / file).read_bytes() == (tmp_path / "again" / file).read_bytes(), file
    settings = json.loads((tmp_path / "imported" / "config.json").read_text())
    expected = {"hybrid": ("tiny", {"attention_every": 2}), "gdn": ("tiny-gdn", {"tie_embeddings": True})}[name]
    assert (settings["model"]["name"], settings["model"]["overrides"]) == expected
