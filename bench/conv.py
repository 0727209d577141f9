"""Benchmark of causal_conv1d (the short convolution + SiLU before the KLA recurrence), on one GPU, in one run.

At B4 T4096 C4608 and B1 T65536 C4608 (kla-0.4b's q, k, v channels; bf16; W = 4), x read in place as the
mixer passes it, a strided view proj.transpose(0, 1)[..., :C] of a [T, B, 6936] projection. Forward and
forward + backward, triton.testing.do_bench medians of:
  ours           causal_conv1d (kernels/conv)
  padded_copies  the mixer's code before it: four padded copies of x in PyTorch, then F.silu
  fla            fla's causal_conv1d (Triton backend), if fla is importable (installed for the benchmark only)
GB/s counts the bytes that must move: x read and y written (forward); x and dy read and dx written again
(backward), bf16, so 4 and 10 bytes per element.
With --sweep, ours is also timed over launch options (kernels/conv/conv1d_triton.py LAUNCH) at the first shape.

    python bench/conv.py --out bench/results/conv.json [--sweep]
"""

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import causal_conv1d  # noqa: E402
from kernels.conv import conv1d_triton  # noqa: E402

SHAPES = [(4, 4096, 4608), (1, 65536, 4608)]
PROJECTION = 6936  # kla-0.4b's in_proj width per token: q, k (12 x 96), v, z (12 x 192), eta, decay (12)
W = 4
SWEEP = dict(L=[64, 128, 256], AHEAD=[2, 4, 8], UNROLL=[4], channels=[(128, 1), (256, 1), (256, 2)])  # (BC, warps)


def padded_copies(x, weight):
    """kla_megatron/mixer.py's causal_conv1d before this op (no packed documents), then SiLU."""
    width = weight.shape[1]
    out = x * weight[:, width - 1]
    for shift in range(1, width):
        out = out + F.pad(x, (0, 0, shift, 0))[:, : x.shape[1]] * weight[:, width - 1 - shift]
    return F.silu(out)


def ours(x, weight):
    return causal_conv1d(x, weight)[0]


def fla_conv():
    try:
        from fla.modules.causal_conv1d import causal_conv1d as fla_causal_conv1d
    except ImportError:
        try:
            from fla.modules.convolution import causal_conv1d as fla_causal_conv1d
        except ImportError:
            return None
    return lambda x, weight: fla_causal_conv1d(x, weight, activation="silu")[0]


def inputs(B, T, C):
    proj = torch.randn(T, B, PROJECTION, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(C, W, device="cuda") / W ** 0.5).requires_grad_(True)
    return proj, weight


def time_ms(fn, proj, weight, C, op, rep=200):
    view = lambda: proj.transpose(0, 1)[..., :C]  # noqa: E731
    if op == "fwd":
        with torch.no_grad():
            return do_bench(lambda: fn(view(), weight), warmup=25, rep=rep, return_mode="median")
    dy = torch.randn(proj.shape[1], proj.shape[0], C, device="cuda", dtype=proj.dtype)
    return do_bench(lambda: fn(view(), weight).backward(dy), warmup=25, rep=rep, grad_to_none=[proj, weight],
                    return_mode="median")


def rows(shapes, fla, result, save):
    calls = {"ours": ours, "padded_copies": padded_copies, **({"fla": fla} if fla else {})}
    for B, T, C in shapes:
        proj, weight = inputs(B, T, C)
        for op, bytes_per_element in (("fwd", 4), ("fwd+bwd", 10)):
            row = {"shape": f"B{B} T{T} C{C}", "op": op, "bytes": B * T * C * bytes_per_element}
            for name, fn in calls.items():
                try:
                    ms = time_ms(fn, proj, weight, C, op)
                    row[f"{name}_ms"], row[f"{name}_GBps"] = round(ms, 4), round(row["bytes"] / ms / 1e6, 1)
                except Exception as e:  # keep the table going if a peer fails; say why
                    row[f"{name}_ms"] = row[f"{name}_GBps"] = None
                    print(f"{name} {row['shape']} {op} failed: {type(e).__name__}: {e}", flush=True)
            for name in calls:
                if name != "ours" and row[f"{name}_ms"] and row["ours_ms"]:
                    row[f"speedup_vs_{name}"] = round(row[f"{name}_ms"] / row["ours_ms"], 2)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            save()
        del proj, weight
        torch.cuda.empty_cache()


def sweep(shape, result, save):
    """Ours over every combination of SWEEP, stage by stage (the other stage at its LAUNCH entry)."""
    B, T, C = shape
    proj, weight = inputs(B, T, C)
    for stage, op in (("fwd", "fwd"), ("bwd", "fwd+bwd")):
        current = dict(conv1d_triton.LAUNCH[stage])
        times = []
        for L, AHEAD, UNROLL, (BC, num_warps) in itertools.product(*SWEEP.values()):
            option = dict(L=L, BC=BC, AHEAD=AHEAD, UNROLL=UNROLL, num_warps=num_warps)
            conv1d_triton.LAUNCH[stage] = option
            try:
                times.append({"option": option, "ms": round(time_ms(ours, proj, weight, C, op, rep=50), 4)})
            except Exception as e:  # out of registers or resources: not a candidate
                print(f"  {stage} {option}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        conv1d_triton.LAUNCH[stage] = current
        times.sort(key=lambda entry: entry["ms"])
        entry = {"stage": stage, "timed": op, "shape": f"B{B} T{T} C{C}", "current": current, "best": times[:5]}
        print(json.dumps(entry), flush=True)
        result["sweep"].append(entry)
        save()


def print_table(result):
    print(f"\n{result['device']}  {result['date']}  (ms; GB/s of the bytes that must move)")
    names = [n for n in ("ours", "padded_copies", "fla") if any(f"{n}_ms" in r for r in result["rows"])]
    print(f"{'shape':20} {'op':8} " + " ".join(f"{n:>22}" for n in names) + "  " +
          " ".join(f"{'vs ' + n:>18}" for n in names[1:]))
    for r in result["rows"]:
        cells = [f"{r[f'{n}_ms']:9.3f} {r[f'{n}_GBps']:7.0f} GB/s" if r.get(f"{n}_ms") else f"{'-':>22}"
                 for n in names]
        ratios = [f"{r[f'speedup_vs_{n}']:17.2f}x" if r.get(f"speedup_vs_{n}") else f"{'-':>18}" for n in names[1:]]
        print(f"{r['shape']:20} {r['op']:8} " + " ".join(cells) + "  " + " ".join(ratios))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/conv.json")
    parser.add_argument("--sweep", action="store_true", help="also time ours over launch options")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    fla = fla_conv()
    print(f"benchmarking on {device}; fla {'found' if fla else 'not importable: its column is left out'}", flush=True)
    result = {"device": device, "date": datetime.date.today().isoformat(), "launch": conv1d_triton.LAUNCH,
              "rows": [], "sweep": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every row, so a run cut short keeps what it measured
        out.write_text(json.dumps(result, indent=1) + "\n")

    rows(SHAPES, fla, result, save)
    if args.sweep:
        sweep(SHAPES[0], result, save)
    print_table(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
