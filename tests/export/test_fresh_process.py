"""An exported folder loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(folder)` in a new Python where none of this project is importable, with this
environment's transformers (5.x) and with the last 4.x (4.57.3), and gives the megatron model's logits, the
SentencePiece encoding and one greedy continuation in both."""

import json

import pytest
import torch

from export_testing import (TRANSFORMERS_4, VOCAB, model_configs, real_texts, run_fresh_python, tokens,
                            transformers_4_path, write_run)
from kla_model_testing import rel_err

TOL = 1e-5  # fp32 on the CPU, the same functions: measured 0.0 (2026-11-30)
PROMPTS = ["def parse(text):\n    ", "import os\n"]

SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = {folder!r}, {out!r}
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(torch.tensor({tokens})).logits
batch = tokenizer({prompts}, return_tensors="pt", padding=True, padding_side="left")
generated = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
torch.save(logits, out + ".pt")
json.dump({{
    "version": transformers.__version__,
    "model_module": type(model).__module__,
    "kernels_imported": sorted(m for m in sys.modules if m == "kernels" or m.startswith("kernels.")),
    "encodings": tokenizer({texts})["input_ids"],
    "generated": generated.tolist(),
}}, open(out + ".json", "w"))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    from kla_megatron.export_hf import export

    root = tmp_path_factory.mktemp("fresh")
    logits = write_run(root / "run", model_configs()["hybrid"], tokenizer, seed=3)
    export(root / "run" / "checkpoints", root / "hybrid-hf", dtype="fp32")
    return root / "hybrid-hf", logits


def _run(folder, workdir, extra_path=None):
    """(what the script reports, its logits, the texts it encoded) from a fresh Python in `workdir`."""
    texts = real_texts(files=5, chars=2000) + [" leading", "a  b", "</s>", "ünï 日本 🙂"]
    out = workdir / "result"
    script = SCRIPT.format(folder=str(folder), out=str(out), tokens=tokens().tolist(), prompts=PROMPTS, texts=texts)
    run_fresh_python(script, workdir, extra_path)
    return json.loads((workdir / "result.json").read_text()), torch.load(workdir / "result.pt"), texts


@pytest.fixture(scope="module")
def with_installed_transformers(exported, tmp_path_factory):
    return _run(exported[0], tmp_path_factory.mktemp("installed"))


def _check(run, reference, tokenizer, major):
    import sentencepiece

    result, logits, texts = run
    assert result["version"].startswith(major)
    assert result["model_module"].startswith("transformers_modules.")
    assert result["kernels_imported"] == [], "the shipped kernels must not pose as the `kernels` package"
    assert logits.shape == (2, tokens().shape[1], VOCAB)
    err = rel_err(logits, reference)
    assert err < TOL, f"transformers {result['version']}: logits rel err {err:.2e}"
    assert result["encodings"] == sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).encode(texts)
    assert torch.tensor(result["generated"]).shape[1] >= 6


def test_loads_with_transformers_5(exported, with_installed_transformers, tokenizer):
    _check(with_installed_transformers, exported[1], tokenizer, "5.")


def test_loads_with_transformers_4(exported, with_installed_transformers, tokenizer, tmp_path):
    run = _run(exported[0], tmp_path, extra_path=transformers_4_path())
    _check(run, exported[1], tokenizer, TRANSFORMERS_4)
    assert run[0]["generated"] == with_installed_transformers[0]["generated"]
