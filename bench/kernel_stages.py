"""Time every Triton stage of chunk_kla alone, over its launch options, beside fla's kernels per stage.

For one shape (bf16 inputs), each stage of kernels/kla/chunk_triton.py (fwd_solve, fwd_wu, fwd_h, fwd_o,
bwd_dv_local, bwd_dh, bwd_dqkg, bwd_prepare) is timed with triton.testing.do_bench for each combination
of warps, pipelining stages, register cap and value block (the grid is set from the command line); the
table shows the time of the current LAUNCH entry, the best option and its time. With --fla, fla's
chunk_gated_delta_rule fwd+bwd is profiled kernel by kernel at the same shape (fla is needed only then).
Writes JSON.

    python bench/kernel_stages.py --shape 8,4096,12,96,192 --out bench/results/kernel_stages.json [--fla]
        [--stages fwd_o,bwd_prepare --warps 4,8 --pipeline 2,3 --maxnreg 0,128 --value-blocks 64 | --current]
"""

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import make_inputs  # noqa: E402
from bench.peers import unlock_fla_backward  # noqa: E402
from kernels.kla import chunk_triton  # noqa: E402
from kernels.kla.sequences import chunk_layout  # noqa: E402



def stage_calls(B, T, H, K, V):
    """A closure per stage that runs it on realistic intermediates (those of one fwd+bwd)."""
    q, k, v, g, eta = make_inputs(B, T, H, K, V, requires_grad=False)
    layout = chunk_layout(B, T, None, q.device)
    s = chunk_triton.Stages(q, k, v, g, eta, K ** -0.5, 1e-6, layout, True, True)
    do = torch.randn_like(v)
    per_token, Ainv = s.fwd_solve()
    w, u = s.fwd_wu(per_token, Ainv)
    h, vn, _, _ = s.fwd_h(per_token, w, u, None, False)
    dv_local = s.bwd_dv_local(per_token, do)
    dh, dvn, _, _ = s.bwd_dh(per_token, w, do, dv_local, None, False)
    dq, dkk, dgc, dw = s.bwd_dqkg(per_token, h, vn, do, dh, dvn)
    return {
        "fwd_solve": lambda: s.fwd_solve(),
        "fwd_wu": lambda: s.fwd_wu(per_token, Ainv),
        "fwd_h": lambda: s.fwd_h(per_token, w, u, None, False),
        "fwd_o": lambda: s.fwd_o(per_token, h, vn),
        "bwd_dv_local": lambda: s.bwd_dv_local(per_token, do),
        "bwd_dh": lambda: s.bwd_dh(per_token, w, do, dv_local, None, False),
        "bwd_dqkg": lambda: s.bwd_dqkg(per_token, h, vn, do, dh, dvn),
        "bwd_prepare": lambda: s.bwd_prepare(per_token, Ainv, dvn, dw, dkk, dgc),
    }


def options_of(stage, grid):
    """Every combination of the grid's values (a register cap of 0 means none; the value block only where
    the stage has one)."""
    blocks = grid["BV"] if "BV" in chunk_triton.LAUNCH[stage] else (None,)
    for num_warps, num_stages, maxnreg, BV in itertools.product(grid["warps"], grid["pipeline"], grid["maxnreg"],
                                                                blocks):
        yield dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
                   **({} if BV is None else dict(BV=BV)))


def sweep(calls, grid):
    """grid None: each stage at its LAUNCH options only."""
    rows = []
    for stage, call in calls.items():
        current = dict(chunk_triton.LAUNCH[stage])
        times = []
        for option in ([current] if grid is None else options_of(stage, grid)):
            chunk_triton.LAUNCH[stage] = option
            try:
                ms = do_bench(call, warmup=5, rep=40, return_mode="median")
            except Exception as e:  # out of shared memory or registers: not a candidate
                print(f"  {stage} {option}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            times.append({"option": option, "ms": round(ms, 4)})
        chunk_triton.LAUNCH[stage] = current
        if not times:
            raise RuntimeError(f"no launch option of {stage} ran")
        best = min(times, key=lambda t: t["ms"])
        now = next((t["ms"] for t in times if t["option"] == current), None)
        row = {"stage": stage, "current": current, "current_ms": now, "best": best["option"], "best_ms": best["ms"],
               "all": times}
        print(f"{stage:14} current {now} ms  best {best['ms']} ms {best['option']}", flush=True)
        rows.append(row)
    return rows


def fla_profile(B, T, H, K, V):
    """Per-kernel GPU time of fla's GDN fwd+bwd (one iteration, averaged over 5)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    unlock_fla_backward()
    q, k, v, g, eta = make_inputs(B, T, H, K, V)
    do = torch.randn_like(v)

    def step():
        chunk_gated_delta_rule(q, k, v, g, eta, use_qk_l2norm_in_kernel=True)[0].backward(do)

    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:60], "ms": round(e.device_time_total / 5 / 1e3, 4)}
            for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        print(f"  fla {r['kernel']:60} {r['ms']:.4f} ms", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,4096,12,96,192", help="B,T,H,K,V")
    parser.add_argument("--out", default="bench/results/kernel_stages.json")
    parser.add_argument("--fla", action="store_true", help="also profile fla's GDN kernels at the shape")
    parser.add_argument("--stages", default=",".join(chunk_triton.LAUNCH), help="stages to time (comma-separated)")
    ints = lambda text: tuple(int(x) for x in text.split(","))
    parser.add_argument("--warps", type=ints, default=(2, 4, 8))
    parser.add_argument("--pipeline", type=ints, default=(1, 2, 3), help="num_stages values")
    parser.add_argument("--maxnreg", type=ints, default=(0,), help="register caps per thread (0: none)")
    parser.add_argument("--value-blocks", type=ints, default=(32, 64))
    parser.add_argument("--current", action="store_true", help="time each stage at its LAUNCH options only")
    args = parser.parse_args()
    shape = ints(args.shape)
    grid = None if args.current else dict(warps=args.warps, pipeline=args.pipeline, maxnreg=args.maxnreg,
                                          BV=args.value_blocks)
    torch.manual_seed(0)
    print(f"stages of chunk_kla at B,T,H,K,V = {shape} on {torch.cuda.get_device_name()}", flush=True)
    calls = stage_calls(*shape)
    rows = sweep({stage: calls[stage] for stage in args.stages.split(",")}, grid)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "shape": shape,
              "stages": rows, "sum_current_ms": round(sum(r["current_ms"] or 0 for r in rows), 4),
              "sum_best_ms": round(sum(r["best_ms"] for r in rows), 4)}
    if args.fla:
        result["fla_kernels"] = fla_profile(*shape)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"sum of stages: current {result['sum_current_ms']} ms, best {result['sum_best_ms']} ms "
          f"(fwd+bwd runs fwd_wu and fwd_h twice)\nwrote {args.out}")


if __name__ == "__main__":
    main()
