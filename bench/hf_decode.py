"""Decode speed of exported models through plain transformers, beside fla's GDN model, on one GPU, in one run.

    python bench/hf_decode.py --out bench/results/hf_decode.json [--rows kla-0.4b:4096:1,...] [--new-tokens 128]
                              [--profile]   # each row also lists its top ops a decode step (torch.profiler)

Rows are model:prompt:batch (default: every model at prompts of 4K and 32K tokens, batch 1 and 64):
  kla-0.4b, transformer-0.4b  our 0.4B shapes, random weights (kla_megatron.init), exported in bf16 by
        kla_megatron.export_hf and loaded with AutoModelForCausalLM.from_pretrained(trust_remote_code=True): KLA keeps
        per layer the conv inputs and the fp32 state (O(1) a token) and replays its steps as CUDA graphs (its
        config's decode_cuda_graphs), the transformer its keys and values (KV cache)
  kla-0.4b-eager  the same KLA export with decode_cuda_graphs=False
  fla-gdn-0.4b  fla's GatedDeltaNetForCausalLM at the same shape (bench/peers.py) with fla's own cache; fla is
        installed for this benchmark only
Vocabulary 32000 (`python -m data_prep default-corpus --vocab-size 32000`'s tokenizer).
Each row runs in its own process: the prompt (random tokens) goes through in chunks of 4096 tokens a sequence with the
cache, then `new` tokens are decoded greedily one step at a time with the cache, the way generate() does without its
bookkeeping; after 8 untimed steps (a KV cache grows its buffers there) the median of 3 timed runs of `new` steps
counts: decode tokens/s = batch * new / time. A row that does not fit in memory says so. The rows go into --out beside
those of earlier runs (a row replaces the committed one of the same model, prompt and batch), each labelled with its
run (--run); the printed ratios are within this run.
"""

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.peers import fla_gdn_model  # noqa: E402
from bench.pretrain import merge_rows, peer_ratios, row_line, rows_in_own_processes, run_label  # noqa: E402

VOCAB = 32000
PREFILL_CHUNK = 4096
WARMUP_STEPS = 8
OURS = ("kla-0.4b", "transformer-0.4b")
EAGER = "kla-0.4b-eager"  # the KLA export with its CUDA graphs off: every step launched op by op
MODELS = OURS + (EAGER, "fla-gdn-0.4b")
DEFAULT_ROWS = [f"{m}:{prompt}:{batch}" for prompt in (4096, 32768) for batch in (1, 64) for m in MODELS]


def prepare_exports(folder: Path) -> None:
    """The default corpus's tokenizer at 32000 pieces and the bf16 export of each of our models (random weights) in
    `folder`."""
    from kla_megatron import build_model, named_model, transformer_config
    from kla_megatron.export_hf import one_process_megatron, write_export
    from kla_megatron.init import initialize_weights

    tokenizer = folder / "corpus" / "tokenizer" / "tokenizer.model"
    if not tokenizer.is_file():
        subprocess.run([sys.executable, "-m", "data_prep", "default-corpus", "--vocab-size", str(VOCAB),
                        "--output", str(folder / "corpus")], cwd=ROOT, check=True)
    for name in OURS:
        if (folder / name).is_dir():
            continue
        model = named_model(name)
        with one_process_megatron():
            config = transformer_config(model, use_cpu_initialization=True)
            megatron = build_model(model, config, VOCAB, 32768 + 1024)
            initialize_weights(megatron, config, seed=0)
            write_export(megatron, model, 32768 + 1024, tokenizer, folder / name, dtype="bf16")


def load(model_name: str, exports: Path):
    if model_name in OURS or model_name == EAGER:
        from transformers import AutoModelForCausalLM

        graphs = {"decode_cuda_graphs": False} if model_name == EAGER else {}
        folder = exports / model_name.removesuffix("-eager")
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.bfloat16, **graphs)
    torch.manual_seed(0)
    return fla_gdn_model(VOCAB).to(torch.bfloat16)


@torch.no_grad()
def run_row(row: str, new_tokens: int, exports: Path, profile: bool) -> dict:
    model_name, prompt, batch = row.split(":")
    prompt, batch = int(prompt), int(batch)
    model = load(model_name, exports).cuda().eval()
    tokens = torch.randint(0, VOCAB, (batch, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cache = None
    for start in range(0, prompt, PREFILL_CHUNK):
        out = model(tokens[:, start:start + PREFILL_CHUNK], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    next_token = out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(steps):
        nonlocal cache, next_token
        for _ in range(steps):
            out = model(next_token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)

    decode(WARMUP_STEPS)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        decode(new_tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {"model": model_name, "prompt": prompt, "batch": batch, "new_tokens": new_tokens,
              "decode_tokens_per_s": round(batch * new_tokens / seconds, 1),
              "ms_per_step": round(1e3 * seconds / new_tokens, 3),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if profile:
        result["top_ops"] = profiled_ops(decode)
    return result


def profiled_ops(decode, steps: int = 4, top: int = 10) -> list:
    """The `top` ops by host time over `steps` decode steps, each per step: calls, host ms, device ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode(steps)
        torch.cuda.synchronize()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count / steps, "host_ms": round(e.self_cpu_time_total / 1e3 / steps, 3),
             "device_ms": round(e.self_device_time_total / 1e3 / steps, 3)} for e in ops]


def table(rows: list) -> str:
    lines = ["| model | prompt | batch | decode tokens/s | ms / step | peak GiB | vs fla-gdn | vs transformer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['prompt']} | {r['batch']} | {r['error']} | | | | |")
            continue
        ratios = peer_ratios(rows, r, ("fla-gdn-0.4b", "transformer-0.4b"), ("prompt", "batch"), "decode_tokens_per_s")
        lines.append(f"| {r['model']} | {r['prompt']} | {r['batch']} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.2f} | {r['peak_gib']:.1f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/hf_decode.json")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--exports", default="/tmp/kla_hf_decode_exports", help="where the exports are made (reused)")
    parser.add_argument("--profile", action="store_true", help="each row also lists its top ops a decode step")
    parser.add_argument("--run", help="the label this run's rows carry in --out (default: start time and GPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one row, in a process of its own
    args = parser.parse_args()
    exports = Path(args.exports)
    if args.worker:
        print(row_line(run_row(args.worker, args.new_tokens, exports, args.profile)), flush=True)
        return 0

    print(f"preparing the exports in {exports}", flush=True)
    prepare_exports(exports)
    import transformers

    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "transformers": transformers.__version__, "vocab": VOCAB, "new_tokens": args.new_tokens}

    run = run_label(args.run, result["device"])

    def command(row):
        return [sys.executable, __file__, "--worker", row, "--new-tokens", str(args.new_tokens),
                "--exports", str(exports)] + (["--profile"] if args.profile else [])

    def failed(row, reason):
        model, prompt, batch = row.split(":")
        return {"model": model, "prompt": int(prompt), "batch": int(batch), "error": reason}

    rows = rows_in_own_processes(args.rows.split(","), command, failed, "decode_tokens_per_s",
                                 lambda rows: merge_rows(Path(args.out), result, rows, ("model", "prompt", "batch"), run))
    for r in rows:
        for op in r.get("top_ops", []):
            print(f"{r['model']}:{r['prompt']}:{r['batch']} | {op['op'][:60]} | {op['calls']:.0f} calls | "
                  f"host {op['host_ms']:.3f} ms | device {op['device_ms']:.3f} ms a step")
    print(f"\n{result['device']}, bf16, transformers {result['transformers']}\n{table(rows)}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
