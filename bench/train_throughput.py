"""Training throughput of our models beside fla's GDN model and Hugging Face Llama, on one GPU, in one run.

    python bench/train_throughput.py --data-manifest DIR/manifest.json --out bench/results/train_throughput.json \
        [--rows kla-0.4b:4096:0,fla-gdn-0.4b:4096:0] [--steps 8]

Rows are model:seq:recompute[:key=value;...] (settings of ours only, e.g. model.kernel_keep_states=false). Every row trains 65,536 tokens a step (4K: 16 sequences in micro-batches of 4;
16K: 4 of 1; 64K: 1), bf16, AdamW, vocabulary 32000:
  ours  (kla-0.4b, gdn-0.4b, transformer-0.4b, hybrid-0.4b) the real trainer, `python -m pretrain` (megatron-core,
        DeepSpeed ZeRO-1 with fp32 master weights, our kernels) on the data manifest; tokens/s from its TensorBoard;
  peers (fla-gdn-0.4b: fla's GatedDeltaNetForCausalLM with fused cross-entropy; hf-llama-sdpa-0.4b: transformers'
        LlamaForCausalLM with SDPA) a plain loop: fp32 weights, bf16 autocast, fused AdamW, random tokens; recompute
        is their gradient checkpointing.
Each row runs in its own process (so peak memory is its own); the median step time after --skip steps counts.
The rows go into --out beside those of earlier runs (a row replaces the committed one of the same model, seq,
recompute and settings), each labelled with its run (--run); the printed ratios to a peer are within this run.

Model FLOPs per token are pretrain.metrics.model_flops_per_token: 2 per weight of every linear layer (output layer
included), the chunkwise recurrence of a KLA/GDN layer ~2 (2 C K + 2 C V + 3 K V) per head (C = 64), causal softmax
attention 2 * 2 * (T / 2) * width per layer, all x3 for forward + backward; a peer is counted with the formula of our
model of its kind (fla's GDN as gdn-0.4b, Llama as transformer-0.4b). MFU is that rate over the dense bf16 peak of
the device (989 TFLOP/s for an H100/H200 SXM). Recompute is not counted as useful work.
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.peers import fla_gdn_model, hf_llama_model  # noqa: E402
from bench.pretrain import merge_rows, peer_ratios, row_line, rows_in_own_processes, run_label, run_trainer  # noqa: E402

TOKENS_PER_STEP = 65536
VOCAB = 32000
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12}
OURS = ("kla-0.4b", "gdn-0.4b", "transformer-0.4b", "hybrid-0.4b")
ROW_KEY = ("model", "seq", "recompute")  # with a row's settings: a new row replaces the committed one of that key
PEERS = {"fla-gdn-0.4b": (fla_gdn_model, "gdn-0.4b"), "hf-llama-sdpa-0.4b": (hf_llama_model, "transformer-0.4b")}
DEFAULT_ROWS = (
    [f"{m}:{s}:0" for s in (4096, 16384) for m in OURS + tuple(PEERS)]
    + [f"{m}:65536:1" for m in OURS + tuple(PEERS)]
    + ["kla-0.4b:4096:1", "fla-gdn-0.4b:4096:1", "transformer-0.4b:4096:1", "hf-llama-sdpa-0.4b:4096:1"]
)


def micro_batch(seq: int) -> int:
    return 4 if seq <= 4096 else 1


def flops_per_token(model: str, seq: int) -> float:
    from kla_megatron.config import named_model
    from pretrain.metrics import model_flops_per_token

    return model_flops_per_token(named_model(PEERS[model][1] if model in PEERS else model), VOCAB, seq)


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), float("nan"))


def run_peer(model_name: str, seq: int, recompute: bool, steps: int, skip: int) -> dict:
    """The peer's own training loop at our settings; returns tokens/s and peak memory."""
    torch.manual_seed(0)
    model = PEERS[model_name][0](VOCAB).cuda()
    if recompute:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    micro = micro_batch(seq)
    accumulation = TOKENS_PER_STEP // (micro * seq)
    tokens = torch.randint(0, VOCAB, (accumulation, micro, seq), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(accumulation):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens[i], labels=tokens[i]).loss
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"tokens_per_s": TOKENS_PER_STEP / statistics.median(times[skip:]),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss_last": loss.item()}


def run_ours(model_name: str, seq: int, recompute: bool, steps: int, skip: int, manifest: str, overrides: list) -> dict:
    micro = micro_batch(seq)
    result = run_trainer("configs/kla_0.4b.toml", [
        f"model.name={model_name}", f"data.manifest={manifest}", f"data.seq_length={seq}",
        f"training.micro_batch_size={micro}", f"training.global_batch_size={TOKENS_PER_STEP // seq}",
        f"training.recompute={'true' if recompute else 'false'}", f"training.steps={steps}", "training.warmup_steps=1",
        "logging.interval=1", "parallel.data=0", *overrides], skip)
    return {"tokens_per_s": result["tokens_per_s"], "peak_gib": result["peak_memory_gib"], "loss_last": result["loss_last"]}


def run_row(row: str, steps: int, skip: int, manifest: str) -> dict:
    model, seq, recompute, *settings = row.split(":", 3)
    seq, recompute, overrides = int(seq), recompute == "1", settings[0].split(";") if settings else []
    if model in PEERS and overrides:
        raise ValueError(f"row {row}: settings apply to our models only")
    run = run_peer(model, seq, recompute, steps, skip) if model in PEERS else run_ours(model, seq, recompute, steps, skip, manifest, overrides)
    tflops = run["tokens_per_s"] * flops_per_token(model, seq) / 1e12
    return {"model": model, "seq": seq, "recompute": recompute, **({"overrides": overrides} if overrides else {}),
            "tokens_per_s_per_gpu": round(run["tokens_per_s"], 1),
            "tflops_per_gpu": round(tflops, 2), "mfu": round(tflops * 1e12 / peak_flops(), 4),
            "peak_gib": round(run["peak_gib"], 2), "loss_last": run["loss_last"]}


def table(rows: list) -> str:
    lines = ["| model | seq | recompute | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB | vs fla-gdn | vs hf-llama |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['seq']} | {r['recompute']} | {r['error']} | | | | | |")
            continue
        ratios = peer_ratios(rows, r, PEERS, ("seq", "recompute"), "tokens_per_s_per_gpu")
        name = " ".join([r["model"], *r.get("overrides", [])])
        lines.append(f"| {name} | {r['seq']} | {r['recompute']} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{r['tflops_per_gpu']:.1f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("--data-manifest", help="a data_prep manifest at vocabulary 32000 (our rows train on it)")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--run", help="the label this run's rows carry in --out (default: start time and GPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one row, in a process of its own
    args = parser.parse_args()
    if args.worker:
        print(row_line(run_row(args.worker, args.steps, args.skip, args.data_manifest)), flush=True)
        return 0

    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "tokens_per_step": TOKENS_PER_STEP}
    run = run_label(args.run, result["device"])

    def command(row):
        return [sys.executable, __file__, "--worker", row, "--steps", str(args.steps), "--skip", str(args.skip),
                "--data-manifest", str(args.data_manifest)]

    def failed(row, reason):
        model, seq, recompute = row.split(":")[:3]
        return {"model": model, "seq": int(seq), "recompute": recompute == "1", "error": reason}

    rows = rows_in_own_processes(args.rows.split(","), command, failed, "tokens_per_s_per_gpu",
                                 lambda rows: merge_rows(Path(args.out), result, rows, ROW_KEY, run))
    print(f"\n{result['device']}, {TOKENS_PER_STEP} tokens a step, bf16, run {run!r}\n{table(rows)}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
