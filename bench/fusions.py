"""The loss curve of kla-0.4b with every fused op of ours against their PyTorch references, on one GPU.

    python bench/fusions.py --data-manifest M [--steps 30] [--out bench/results/fusions.json] [--before OLD.json]

Two runs of the real trainer (bench/pretrain.py) from the same seed on the same data, bf16, 4096-token sequences,
8 a step: `model.kernel_backend=torch` (the PyTorch reference of the recurrence, the causal conv + SiLU, the gated
and plain RMSNorms and the cross-entropy) and `model.kernel_backend=triton` (our Triton kernels). Every step's loss
of the fused run must stay within BOUND (relative) of the reference run's: the two round bf16 intermediates
differently, and that difference grows over the steps as the weights part. Prints the curves side by side and
writes the JSON. --before names an earlier result of this script (e.g. `git show REV:bench/results/fusions.json`):
the fused run's curve is then also compared with that one's, step by step, which shows a change to the kernels or
the layer leaves the training numerically where it was (zero when the change moves no arithmetic).
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pretrain import run_trainer  # noqa: E402

BOUND = 2e-2  # bf16, as the 2-GPU layouts against one GPU (bench/parallel.py)
BACKENDS = ("torch", "triton")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-manifest", required=True, help="a data_prep manifest at vocabulary 32000")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="bench/results/fusions.json")
    parser.add_argument("--before", help="an earlier fusions.json whose fused curve this run's is compared with")
    args = parser.parse_args()
    runs = {}
    for backend in BACKENDS:
        runs[backend] = run_trainer("configs/kla_0.4b.toml", [
            f"data.manifest={args.data_manifest}", f"model.kernel_backend={backend}", "training.micro_batch_size=4",
            "training.global_batch_size=8", f"training.steps={args.steps}", "training.warmup_steps=3",
            "logging.interval=1", "parallel.data=0"], skip=3)
    ref, fused = runs["torch"]["series"]["loss"], runs["triton"]["series"]["loss"]
    diffs = [abs(f - r) / abs(r) for f, r in zip(fused, ref)]
    result = {"device": runs["triton"]["device"], "date": datetime.date.today().isoformat(), "model": "kla-0.4b",
              "steps": args.steps, "bound": BOUND, "max_rel_loss_diff": max(diffs), "within_bound": max(diffs) <= BOUND,
              "loss": {"torch": ref, "triton": fused},
              "tokens_per_s": {b: runs[b]["tokens_per_s"] for b in BACKENDS},
              "peak_gib": {b: runs[b]["peak_memory_gib"] for b in BACKENDS}}
    if args.before:
        before = json.loads(Path(args.before).read_text())
        old = before["loss"]["triton"][:args.steps]
        result["before"] = {"date": before["date"], "loss": old,
                            "max_rel_loss_diff": max(abs(f - o) / abs(o) for f, o in zip(fused, old))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']}: kla-0.4b, bf16, same seed and data\n| step | PyTorch references | Triton kernels | "
          "relative difference |\n|---|---|---|---|")
    for step in range(0, args.steps, 5):
        print(f"| {step + 1} | {ref[step]:.4f} | {fused[step]:.4f} | {diffs[step]:.1e} |")
    print(f"| {args.steps} | {ref[-1]:.4f} | {fused[-1]:.4f} | {diffs[-1]:.1e} |")
    print(f"largest relative difference {max(diffs):.2e} (bound {BOUND:.0e}); tokens/s "
          f"{result['tokens_per_s']['torch']:,.0f} (references) vs {result['tokens_per_s']['triton']:,.0f} (fused)")
    if args.before:
        print(f"against the earlier fused curve ({args.before}): largest relative difference "
              f"{result['before']['max_rel_loss_diff']:.2e}")
    print(f"wrote {args.out}")
    return 0 if result["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
