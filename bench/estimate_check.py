"""pretrain.estimate against measured peak memory: a few training steps of each run on this machine's
GPUs, the peak torch.cuda.max_memory_allocated of the reporting rank (last pipeline stage, first data-
and tensor-parallel rank) beside the estimate of that rank.

    python bench/estimate_check.py --gpus 1 --manifest DATA/manifest.json --out bench/results/estimate_check_h200.json
    python bench/estimate_check.py --gpus 2 --manifest DATA/manifest.json --out bench/results/estimate_check_h200x2.json

--gpus picks the runs below that need that many GPUs (--runs 0 2: only those of them, to fit a time limit).
Without --manifest it first builds the default corpus at the paper's vocabulary (`python -m data_prep
default-corpus --vocab-size 32000`, a minute or two). Each run goes through bench/pretrain.py (8 steps,
checkpoints and validation off), about a minute after the first compile; prints a table and writes JSON,
merged into --out, whose rows also serve pretrain.estimate as throughput measurements.
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# parallel.data=0: the ready configs name their cluster's data-parallel size; here it is what the GPUs give.
STEPS = ["training.steps=8", "training.warmup_steps=1", "training.precision=bf16", "parallel.data=0"]
# (GPUs, config, overrides): the layouts of the ready configs at sizes that fit 1-2 GPUs.
RUNS = [
    (1, "configs/kla_0.4b.toml", ["training.global_batch_size=8"]),
    (1, "configs/kla_0.4b.toml", ["training.global_batch_size=8", "model.kernel_keep_states=false"]),
    (1, "configs/kla_0.4b.toml", ["training.global_batch_size=8", "training.recompute=true"]),
    (1, "configs/kla_0.4b.toml", ["training.global_batch_size=8", "model.name=transformer-0.4b"]),
    (1, "configs/kla_1.3b.toml", ["training.global_batch_size=8"]),
    (2, "configs/kla_0.4b.toml", ["training.global_batch_size=16"]),
    (2, "configs/kla_0.4b.toml", ["training.global_batch_size=16", "parallel.zero_stage=2"]),
    (2, "configs/kla_0.4b.toml", ["training.global_batch_size=8", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
    (2, "configs/kla_1.3b.toml", ["training.global_batch_size=8", "parallel.pipeline=2", "training.micro_batch_size=1"]),
    (2, "configs/kla_0.4b_long.toml", ["training.global_batch_size=2", "parallel.context=2", "data.seq_length=32768"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, required=True, help="run the checks that use this many GPUs")
    parser.add_argument("--manifest", help="a data_prep manifest (default: build the default corpus at vocab 32000)")
    parser.add_argument("--runs", type=int, nargs="+", help="indices among the runs of --gpus (default: all)")
    parser.add_argument("--out", required=True, help="JSON results file (rows of other runs in it are kept)")
    args = parser.parse_args()

    from pretrain.config import load_config
    from pretrain.estimate import GIB, estimate, vocab_size_of

    with tempfile.TemporaryDirectory() as scratch:
        manifest = args.manifest
        if manifest is None:
            manifest = str(Path(scratch) / "corpus" / "manifest.json")
            subprocess.run([sys.executable, "-m", "data_prep", "default-corpus", "--output", str(Path(manifest).parent),
                            "--vocab-size", "32000"], cwd=ROOT, check=True)
        previous = json.loads(Path(args.out).read_text())["runs"] if Path(args.out).exists() else []
        rows = []
        chosen = [run for run in RUNS if run[0] == args.gpus]
        for index, (gpus, config_path, overrides) in enumerate(chosen):
            if args.runs is not None and index not in args.runs:
                continue
            overrides = [*STEPS, f'data.manifest="{manifest}"', *overrides]
            config = load_config(str(ROOT / config_path), overrides)
            vocab = vocab_size_of(config)
            predicted = estimate(config, gpus, vocab).ranks[-1]  # the reporting rank's (last pipeline rank)
            out = Path(scratch) / f"run{index}.json"
            command = [sys.executable, str(ROOT / "bench" / "pretrain.py"), "--config", config_path, "--out", str(out),
                       "--skip", "3", "--nproc", str(gpus), *overrides]
            print("running:", " ".join(command), flush=True)
            row = dict(world_size=gpus, model=config.model.name, vocab_size=vocab, estimated_rank=predicted.rank,
                       overrides=[o for o in overrides if not o.startswith("data.manifest")], estimated_peak_gib=predicted.peak / GIB)
            if subprocess.run(command, cwd=ROOT).returncode == 0:
                measured = json.loads(out.read_text())
                measured.pop("series")
                row.update(measured, error=row["estimated_peak_gib"] / measured["peak_memory_gib"] - 1)
            else:  # out of memory, most likely: the training log above says
                row.update(failed=True, peak_memory_gib=float("nan"), error=float("nan"), tokens_per_s=float("nan"))
            rows.append(row)
            done = {(r["world_size"], tuple(r["overrides"])) for r in rows}
            kept = [r for r in previous if (r["world_size"], tuple(r["overrides"])) not in done]
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "runs": kept + rows}, indent=1) + "\n")

    print("\n| GPUs | config | overrides | estimated GiB | measured GiB | error | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        changed = " ".join(o for o in row["overrides"] if o not in STEPS)
        print(f"| {row['world_size']} | {row['model']} | {changed} | {row['estimated_peak_gib']:.2f} | {row['peak_memory_gib']:.2f} | "
              f"{row['error']:+.1%} | {row['tokens_per_s']:,.0f} |")
    worst = max((abs(r["error"]) for r in rows if not r.get("failed")), default=0)
    print(f"largest error {worst:.1%}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
