"""End-to-end training throughput: runs `python -m pretrain` and tables what its TensorBoard recorded.

    python bench/pretrain.py --config configs/kla_0.4b.toml --out bench/results/pretrain_kla-0.4b.json \
        training.steps=50 data.manifest=... [--profile-steps 10 13]

Prints a table (tokens/s, TFLOP/s per GPU, peak memory, loss at start and end) and writes JSON
with the device name, the date and the per-step series (and, with --profile-steps, the per-component
table of pretrain/profiling.py). The first steps (compilation, autotuning) are left out of the medians.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pretrain.profiling import format_table  # noqa: E402


def merge_results(part: dict, out: Path):
    """Write `part`'s keys into the JSON at `out`, keeping the keys other runs (or subcommands) wrote there."""
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(part)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def merge_rows(out: Path, result: dict, rows: list, key: tuple, run: str):
    """Write this run's `rows` (each labelled `run`) and `result`'s keys into the JSON at `out`, beside the rows of
    other runs: a row replaces an earlier one with the same `key` fields and settings ("overrides"), the rest stay.
    A benchmark's committed JSON so gathers what several runs measured, and every row says which run it came from."""
    old = json.loads(out.read_text()) if out.exists() else {}

    def same(row):
        return tuple(json.dumps(row.get(field)) for field in (*key, "overrides"))

    new = {same(row) for row in rows}
    kept = [row for row in old.get("rows", []) if same(row) not in new]
    merge_results({**result, "rows": kept + [{**row, "run": run} for row in rows]}, out)


def run_label(args_run, device: str) -> str:
    """The label rows of this run carry: --run, or the start time and the device."""
    return args_run or f"{datetime.datetime.now():%Y-%m-%d %H:%M} {device}"


def row_line(result: dict) -> str:
    """How a row's worker process hands its result to `rows_in_own_processes`."""
    return "ROW " + json.dumps(result)


def rows_in_own_processes(todo: list, command: Callable[[str], list], failed: Callable[[str, str], dict],
                          shown: str, write: Callable[[list], None]) -> list:
    """Runs each row of `todo` as `command(row)` in a process of its own, so its peak memory is its own. A row's
    result is the process's last `row_line`, else `failed(row, reason)`. Prints each row's `shown` value with an
    ETA and calls `write(rows)` after every row, so a run cut short keeps what it measured. Triton's autotuning
    results stay on disk, so a kernel (fla's above all) tunes once per shape for the whole run, not once per row."""
    env = {"TRITON_CACHE_AUTOTUNING": "1", **os.environ}
    rows, started = [], time.time()
    for i, row in enumerate(todo):
        done = subprocess.run(command(row), cwd=ROOT, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if lines:
            rows.append(json.loads(lines[-1][4:]))
        else:
            memory = "out of memory" in done.stderr.lower()
            rows.append(failed(row, "out of memory" if memory else f"failed: {done.stderr.strip().splitlines()[-1:]}"))
        elapsed = time.time() - started
        print(f"[{i + 1}/{len(todo)}] {row}: {rows[-1].get(shown, rows[-1].get('error'))} | "
              f"{elapsed:.0f} s elapsed, ETA {elapsed / (i + 1) * (len(todo) - i - 1):.0f} s", flush=True)
        write(rows)
    return rows


def peer_ratios(rows: list, row: dict, peers, same: tuple, value: str) -> list:
    """`row`'s `value` over each peer's, from the rows that ran (no error) with the same `same` fields; "" where
    a peer has no such row."""
    ok = {tuple(r[f] for f in (*same, "model")): r for r in rows if "error" not in r}
    found = (ok.get((*(row[f] for f in same), peer)) for peer in peers)
    return [f"{row[value] / p[value]:.2f}x" if p else "" for p in found]


def run_trainer(config: str, overrides: list, skip: int, profile_steps=None, env=None, nproc: int = 1) -> dict:
    """One `python -m pretrain` run (no checkpoints, no validation) on `nproc` processes (torchrun when more
    than one); its medians, peaks and series."""
    with tempfile.TemporaryDirectory() as run_dir:
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node", str(nproc)]
        command = [*launcher, "-m", "pretrain", "--config", config, f'output_dir="{run_dir}"',
                   "checkpoint.interval=0", "eval.interval=0", *overrides]
        if profile_steps:
            command.append(f"logging.profile_steps={list(profile_steps)}")
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, env=env)
        events = EventAccumulator(str(Path(run_dir) / "tb"))
        events.Reload()
        series = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        resolved = json.loads((Path(run_dir) / "config.json").read_text())
        profile = json.loads((Path(run_dir) / "profile" / "step_profile.json").read_text()) if profile_steps else None

    def median(tag):
        return statistics.median(series[tag][skip:] or series[tag])

    loss = series["train/loss"]
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "world_size": nproc,
        "model": resolved["model"]["name"],
        "seq_length": resolved["data"]["seq_length"],
        "global_batch_size": resolved["training"]["global_batch_size"],
        "micro_batch_size": resolved["training"]["micro_batch_size"],
        "precision": resolved["training"]["precision"],
        "recompute": resolved["training"]["recompute"],
        "steps": len(loss),
        "tokens_per_s": median("perf/tokens_per_s"),
        "tflops_per_gpu": median("perf/tflops_per_gpu"),
        "peak_memory_gib": max(series["perf/peak_memory_gib"]),
        "loss_first": loss[0],
        "loss_last": loss[-1],
        "profile": profile,
        "series": {"loss": loss, "tokens_per_s": series["perf/tokens_per_s"]},
        "config": resolved,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--profile-steps", type=int, nargs=2, metavar=("FIRST", "LAST"),
                        help="profile steps [FIRST, LAST) and add the per-component table to the JSON")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs), started by torchrun when more than one")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    result = run_trainer(args.config, args.overrides, args.skip, args.profile_steps, nproc=args.nproc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    loss = result["series"]["loss"]
    print("\n| device | model | seq | tokens/s | TFLOP/s/GPU | peak GiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {result['device']} | {result['model']} | {result['seq_length']} | {result['tokens_per_s']:,.0f} | "
        f"{result['tflops_per_gpu']:.1f} | {result['peak_memory_gib']:.1f} | {loss[0]:.3f} -> {loss[-1]:.3f} |"
    )
    if result["profile"]:
        print(f"\nprofile of steps {args.profile_steps[0]}..{args.profile_steps[1] - 1}:\n{format_table(result['profile'])}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
