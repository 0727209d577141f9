"""End-to-end training throughput: runs `python -m pretrain` and tables what its TensorBoard recorded.

    python bench/pretrain.py --config configs/kla_0.4b.toml --out bench/results/pretrain_kla-0.4b.json \
        training.steps=50 data.manifest=...

Prints a table (tokens/s, TFLOP/s per GPU, peak memory, loss at start and end) and writes JSON
with the device name, the date and the per-step series. The first steps (compilation, autotuning)
are left out of the medians.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--profile-steps", type=int, nargs=2, metavar=("FIRST", "LAST"),
                        help="profile steps [FIRST, LAST) and add the per-component table to the JSON")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "pretrain", "--config", args.config, f'output_dir="{run_dir}"',
                   "checkpoint.interval=0", "eval.interval=0", *args.overrides]
        if args.profile_steps:
            command.append(f"logging.profile_steps={list(args.profile_steps)}")
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        events = EventAccumulator(str(Path(run_dir) / "tb"))
        events.Reload()
        series = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        config = json.loads((Path(run_dir) / "config.json").read_text())
        profile_file = Path(run_dir) / "profile" / "step_profile.json"
        profile = json.loads(profile_file.read_text()) if args.profile_steps else None

    def median(tag):
        return statistics.median(series[tag][args.skip:] or series[tag])

    loss = series["train/loss"]
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "model": config["model"]["name"],
        "seq_length": config["data"]["seq_length"],
        "global_batch_size": config["training"]["global_batch_size"],
        "micro_batch_size": config["training"]["micro_batch_size"],
        "precision": config["training"]["precision"],
        "recompute": config["training"]["recompute"],
        "steps": len(loss),
        "tokens_per_s": median("perf/tokens_per_s"),
        "tflops_per_gpu": median("perf/tflops_per_gpu"),
        "peak_memory_gib": max(series["perf/peak_memory_gib"]),
        "loss_first": loss[0],
        "loss_last": loss[-1],
        "profile": profile,
        "series": {"loss": loss, "tokens_per_s": series["perf/tokens_per_s"]},
        "config": config,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n| device | model | seq | tokens/s | TFLOP/s/GPU | peak GiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {result['device']} | {result['model']} | {result['seq_length']} | {result['tokens_per_s']:,.0f} | "
        f"{result['tflops_per_gpu']:.1f} | {result['peak_memory_gib']:.1f} | {loss[0]:.3f} -> {loss[-1]:.3f} |"
    )
    if profile:
        from pretrain.profiling import format_table

        print(f"\nprofile of steps {args.profile_steps[0]}..{args.profile_steps[1] - 1}:\n{format_table(profile)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
