"""Every parallel layout on 2 GPUs trains like 1 GPU: per-step losses of a small KLA model, fp32 and bf16.

    python bench/parallel.py reference --data-manifest M --dir D              # 1 GPU: fp32 and bf16 runs
    torchrun --nproc_per_node 2 bench/parallel.py cases --data-manifest M --dir D   # every 2-GPU layout
    python bench/parallel.py report --dir D --out bench/results/parallel.json
    python bench/parallel.py reshard --data-manifest M --dir D       # 2 GPUs: save at one layout, resume at another
    python bench/parallel.py speed --data-manifest M                 # 2 GPUs: kla-0.4b tokens/s per layout

Each case is the real trainer (`pretrain.train.run`: megatron-core, DeepSpeed ZeRO, our kernels) for STEPS
steps from the same seed and data; the initial weights do not depend on the layout (kla_megatron.init), so
every step's loss is compared with the 1-GPU run's: the largest relative difference over the steps is
reported (issue bounds: fp32 1e-4, bf16 2e-2). Runs of one process share its imports and compiled kernels.
reshard: the same model trained STEPS steps at one layout, saving at step RESHARD_AT; that checkpoint resumed at
another layout (`python -m pretrain --resume`) must continue the saved run's losses.
speed: tokens/s per GPU of kla-0.4b (4096-token sequences, 65,536 tokens a step, bf16) through bench/pretrain.py
at each 2-GPU layout beside one GPU.
Each subcommand merges its part into --out.
"""

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pretrain import merge_results, run_trainer  # noqa: E402

STEPS = 20
MODEL = ["model.name=tiny", "model.num_layers=4", "data.seq_length=256", "training.micro_batch_size=2",
         "training.global_batch_size=8", f"training.steps={STEPS}", "training.warmup_steps=2", "training.lr=1e-3",
         "eval.interval=0", "checkpoint.interval=0", "logging.interval=5"]
BOUNDS = {"fp32": 1e-4, "bf16": 2e-2}
# name: the parallel.* settings (and any other key given whole) of the case on 2 GPUs (the rest of the 2 GPUs is data parallel, ZeRO-1 unless set)
CASES = {
    "tp2": {"tensor": 2},
    "tp2-sp": {"tensor": 2, "sequence_parallel": True},
    "pp2-1f1b": {"pipeline": 2},
    "pp2-uneven": {"pipeline": 2, "pipeline_layers": [3, 1]},
    "pp2-interleaved": {"pipeline": 2, "virtual_pipeline": 2},  # 4 micro-batches: the schedule's steady state
    "cp2": {"context": 2},
    "dp2-zero1": {},
    "dp2-zero2": {"zero_stage": 2},
}
# name: (settings of the saving run, of the resuming run), as in CASES; None is one GPU.
RESHARDS = {
    "tp2-to-pp2": ({"tensor": 2}, {"pipeline": 2}),
    "pp2-to-pp1": ({"pipeline": 2}, None),
    "dp2-to-dp1": ({"zero_stage": 2}, None),
    "dp1-to-tp2": (None, {"tensor": 2}),
}
RESHARD_AT = 10
SPEED = {"dp1": None, **{name: CASES[name] for name in ("dp2-zero1", "tp2", "tp2-sp", "cp2")},
         "pp2-1f1b": {"pipeline": 2, "pipeline_layers": [6, 5]}}  # kla-0.4b's 11 layers


def train(directory: Path, manifest: str, dtype: str, overrides: list) -> dict:
    """One run of the trainer in this process; returns {step: loss} from the reporting rank's history."""
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.train import run

    config = load_config(None, MODEL + [f'data.manifest="{manifest}"', f'output_dir="{directory}"',
                                        f"training.precision={dtype}", *overrides])
    run(config, resume=False)
    if dist.is_initialized():
        dist.destroy_process_group()
    histories = list(directory.glob("history_rank*.json"))
    return json.loads(histories[0].read_text())["train_loss"] if histories else None


def layout_overrides(case: dict) -> list:
    return [f"{key if '.' in key else 'parallel.' + key}={json.dumps(value)}" for key, value in case.items()]


def layout_fields(case, gpus=2) -> dict:
    """tp, sp, pp, vpp, cp, dp, zero_stage of a case's settings (None: one GPU)."""
    if case is None:
        case, gpus = {}, 1
    sizes = {k: case.get(k, 1) for k in ("tensor", "pipeline", "virtual_pipeline", "context")}
    return {"tp": sizes["tensor"], "sp": case.get("sequence_parallel", False), "pp": sizes["pipeline"],
            "vpp": sizes["virtual_pipeline"], "cp": sizes["context"],
            "dp": gpus // (sizes["tensor"] * sizes["pipeline"] * sizes["context"]), "zero_stage": case.get("zero_stage", 1)}


def layout_name(case) -> str:
    f = layout_fields(case)
    return f"tp{f['tp']}pp{f['pp']}dp{f['dp']}" + (f"cp{f['cp']}" if f["cp"] > 1 else "")


def launcher(case) -> list:
    if case is None:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def reshard(work: Path, manifest: str, out: Path, names: list):
    """Each of RESHARDS named in bf16: the saving run's losses after RESHARD_AT against the resumed run's."""
    rows = []
    for name in names:
        saved, resumed = RESHARDS[name]
        common = MODEL + [f'data.manifest="{manifest}"', "training.precision=bf16", f"checkpoint.interval={RESHARD_AT}"]
        full, cont = work / f"reshard-{name}-full", work / f"reshard-{name}-resumed"
        for folder in (full, cont):
            shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(launcher(saved) + ["-m", "pretrain", f'output_dir="{full}"', *common,
                                          *layout_overrides(saved or {})], cwd=ROOT, check=True)
        step = f"step_{RESHARD_AT:07d}"
        shutil.copytree(full / "checkpoints" / step, cont / "checkpoints" / step)
        (cont / "checkpoints" / "latest").write_text(step + "\n")
        subprocess.run(launcher(resumed) + ["-m", "pretrain", "--resume", f'output_dir="{cont}"', *common,
                                            *layout_overrides(resumed or {})], cwd=ROOT, check=True)
        ref, ours = (json.loads(next(d.glob("history_rank*.json")).read_text())["train_loss"] for d in (full, cont))
        after = [s for s in ref if int(s) > RESHARD_AT]
        rows.append({"name": name, "from": layout_name(saved), "to": layout_name(resumed), "dtype": "bf16",
                     "resumed_at": RESHARD_AT, "steps": STEPS,
                     "max_rel_loss_diff": max(abs(ours[s] - ref[s]) / abs(ref[s]) for s in after)})
        print(f"{name}: {rows[-1]['max_rel_loss_diff']:.2e}", flush=True)
        merge_results({"reshard": rows}, out)
    print("| saved at | resumed at | max relative loss difference, steps after the resume |\n|---|---|---|")
    for r in rows:
        print(f"| {r['from']} | {r['to']} | {r['max_rel_loss_diff']:.2e} |")


def speed(manifest: str, out: Path, names: list):
    """kla-0.4b tokens/s per GPU at each layout of SPEED named (the trainer's median over steps 3-6); the
    other layouts' rows already in `out` are kept."""
    earlier = {r["name"]: r for r in json.loads(out.read_text()).get("speed", [])} if out.exists() else {}
    rows = {}
    for name, case in SPEED.items():
        if name not in names:
            if name in earlier:
                rows[name] = earlier[name]
            continue
        overrides = [f"data.manifest={manifest}", "data.seq_length=4096", "training.micro_batch_size=4",
                     "training.global_batch_size=16", "training.steps=6", "training.warmup_steps=1",
                     "logging.interval=1", "parallel.data=0", *layout_overrides(case or {})]
        gpus = 1 if case is None else 2
        run = run_trainer("configs/kla_0.4b.toml", overrides, skip=2, nproc=gpus)
        rows[name] = {"name": name, **layout_fields(case, gpus), "gpus": gpus,
                      "tokens_per_s_per_gpu": round(run["tokens_per_s"] / gpus, 1),
                      "peak_gib": round(run["peak_memory_gib"], 2)}
        merge_results({"speed": [rows[n] for n in SPEED if n in rows]}, out)
    base = rows["dp1"]["tokens_per_s_per_gpu"] if "dp1" in rows else None
    print("| layout | GPUs | tokens/s per GPU | vs 1 GPU | peak GiB |\n|---|---|---|---|---|")
    for r in (rows[n] for n in SPEED if n in rows):
        ratio = f"{r['tokens_per_s_per_gpu'] / base:.2f}" if base else "-"
        print(f"| {r['name']} | {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | {ratio} | {r['peak_gib']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["reference", "cases", "report", "reshard", "speed"])
    parser.add_argument("--dir", default="/tmp/parallel", help="working folder for the runs and their losses")
    parser.add_argument("--data-manifest")
    parser.add_argument("--out", default="bench/results/parallel.json")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtypes", default=",".join(BOUNDS))
    parser.add_argument("--reshards", default=",".join(RESHARDS))
    parser.add_argument("--layouts", default=",".join(SPEED), help="speed: the layouts to measure")
    args = parser.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.what == "reshard":
        reshard(work, args.data_manifest, Path(args.out), args.reshards.split(","))
        return 0
    if args.what == "speed":
        speed(args.data_manifest, Path(args.out), args.layouts.split(","))
        return 0
    if args.what == "reference":
        for dtype in args.dtypes.split(","):
            losses = train(work / f"reference-{dtype}", args.data_manifest, dtype, [])
            (work / f"reference-{dtype}.json").write_text(json.dumps(losses))
        return 0
    if args.what == "cases":
        import os

        started, todo = time.time(), [(n, d) for n in args.cases.split(",") for d in args.dtypes.split(",")]
        # Each run opens its own process group: a fresh rendezvous store per run, on a port all ranks derive.
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        base_port = int(os.environ["MASTER_PORT"]) + 1
        for i, (name, dtype) in enumerate(todo):
            os.environ["MASTER_PORT"] = str(base_port + i)
            losses = train(work / f"{name}-{dtype}", args.data_manifest, dtype, layout_overrides(CASES[name]))
            if losses is not None:  # the reporting rank
                (work / f"{name}-{dtype}.json").write_text(json.dumps(losses))
            if os.environ.get("RANK") == "0":
                elapsed = time.time() - started
                print(f"[{i + 1}/{len(todo)}] {name} {dtype} done, {elapsed:.0f} s, "
                      f"ETA {elapsed / (i + 1) * (len(todo) - i - 1):.0f} s", flush=True)
        return 0

    import torch

    out = Path(args.out)
    earlier = {(c["name"], c["dtype"]): c for c in json.loads(out.read_text()).get("cases", [])} if out.exists() else {}
    cases = []
    for name, case in CASES.items():
        for dtype, bound in BOUNDS.items():
            ref_file, case_file = work / f"reference-{dtype}.json", work / f"{name}-{dtype}.json"
            row = {"name": name, **layout_fields(case), "parallel": case, "dtype": dtype, "steps": STEPS, "bound": bound}
            if not case_file.is_file() and (name, dtype) in earlier:  # not run this time: keep the earlier measurement
                cases.append({**row, **earlier[name, dtype]})
                continue
            if not (ref_file.is_file() and case_file.is_file()):
                row["error"] = "not run" if not case_file.is_file() else "no reference"
            else:
                ref, ours = json.loads(ref_file.read_text()), json.loads(case_file.read_text())
                row["max_rel_loss_diff"] = max(abs(ours[s] - ref[s]) / abs(ref[s]) for s in ref)
                row["first_loss"], row["last_loss"] = ours["1"], ours[str(STEPS)]
            cases.append(row)
    merge_results({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "date": datetime.date.today().isoformat(), "model": MODEL, "cases": cases}, out)
    print("| case | dtype | max relative loss difference vs 1 GPU | bound | loss step 1 -> last |\n|---|---|---|---|---|")
    for r in cases:
        diff = f"{r['max_rel_loss_diff']:.2e}" if "max_rel_loss_diff" in r else r["error"]
        losses = f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}" if "first_loss" in r else ""
        print(f"| {r['name']} | {r['dtype']} | {diff} | {r['bound']:.0e} | {losses} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
