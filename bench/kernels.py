"""Benchmark of the KLA Triton kernels beside fla (issue 4), on one GPU, in one run.

Per shape of SHAPES (the paper's 0.4B layer, a K128 V128 layer, 64K tokens), fwd and fwd+bwd (bf16 inputs, fp32 gates), triton.testing.do_bench
medians of:
  ours            chunk_kla (KLA: key norm, beta, q norm and gate cumsum inside the kernels), states kept
  ours_recompute  the same with keep_states=False: the backward recomputes them, as fla does
  fla_gdn     fla's chunk_gated_delta_rule, use_qk_l2norm_in_kernel=True (the GDN baseline)
  fla_kla     fla's kernel on KLA prepared in PyTorch (q normalised, beta = eta/(|k|^2+eps), raw k)
and the decode table (one token, H=12, K=96, V=192, fp32 states): ours with an in-place pool of
states vs fla's fused_recurrent_gated_delta_rule, called eagerly and replayed from a CUDA graph. Beside
each row: the floor, max(bytes / 3.0 TB/s, FLOPs / 690 TFLOP/s), and ours' fraction of it (floor / time).
fla is needed only here.

    python bench/kernels.py --out bench/results/kernels.json [--shapes 8,4096,12,96,192 --decode-batches 64]
(bench/kernel_stages.py times each stage alone over its launch options, and fla's kernels one by one.)
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import chunk_kla, fused_recurrent_kla  # noqa: E402
from bench.peers import unlock_fla_backward  # noqa: E402

BANDWIDTH = 3.0e12   # bytes/s, device-to-device copy measured on the H100 (docs/design.md, section 4)
MATMUL = 690e12      # bf16 FLOP/s
SHAPES = [(8, 4096, 12, 96, 192), (4, 8192, 16, 128, 128), (1, 65536, 12, 96, 192)]
DECODE_BATCHES = [1, 16, 64, 256]
EPS = 1e-6


def make_inputs(B, T, H, K, V, requires_grad=True):
    q = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)
    k = (torch.randn(B, T, H, K, device="cuda") * torch.randn(B, T, H, 1, device="cuda").exp()).bfloat16()
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 4)
    eta = torch.sigmoid(torch.randn(B, T, H, device="cuda"))
    tensors = [q, k, v, g, eta]
    return [x.requires_grad_(requires_grad) for x in tensors]


def ours(q, k, v, g, eta):
    return chunk_kla(q, k, v, g, eta)[0]


def ours_recompute(q, k, v, g, eta):
    return chunk_kla(q, k, v, g, eta, keep_states=False)[0]


def fla_gdn(q, k, v, g, eta):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule(q, k, v, g, eta, use_qk_l2norm_in_kernel=True)[0]


def fla_kla(q, k, v, g, eta):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    qn = q * torch.rsqrt(q.float().square().sum(-1, keepdim=True) + EPS).to(q.dtype)
    beta = eta / (k.float().square().sum(-1) + EPS)
    return chunk_gated_delta_rule(qn, k, v, g, beta)[0]


def time_fwd(fn, inputs):
    return do_bench(lambda: fn(*inputs), warmup=25, rep=150, return_mode="median")


def time_fwd_bwd(fn, inputs):
    do = torch.randn_like(inputs[2])
    return do_bench(lambda: fn(*inputs).backward(do), warmup=25, rep=150, grad_to_none=inputs, return_mode="median")


def floor_ms(B, T, H, K, V, op):
    """Each input read once, each output written once; FLOPs of the chunked algorithm (64-token chunks:
    kk^T, w, qk^T (3 BT^2 K), u, P vn (2 BT^2 V), w h, state update, q h (3 BT K V) per chunk), bwd = 2x fwd."""
    tokens = B * T * H
    fwd_bytes = tokens * (2 * (2 * K + V) + 8 + 2 * V)                    # q, k, v, g, eta in; o out
    bwd_bytes = tokens * (2 * (2 * K + 2 * V) + 8 + 2 * (2 * K + V) + 8)  # q, k, v, do, g, eta in; grads out
    fwd_flops = 2 * tokens * (3 * 64 * K + 2 * 64 * V + 3 * K * V)
    nbytes, flops = (fwd_bytes, fwd_flops) if op == "fwd" else (fwd_bytes + bwd_bytes, 3 * fwd_flops)
    return max(nbytes / BANDWIDTH, flops / MATMUL) * 1e3


def chunk_rows(shapes, rows, save):
    for B, T, H, K, V in shapes:
        inputs = make_inputs(B, T, H, K, V)
        shape = f"B{B} T{T} H{H} K{K} V{V}"
        for op, timer in (("fwd", time_fwd), ("fwd+bwd", time_fwd_bwd)):
            row = {"shape": shape, "op": op}
            for name, fn in (("ours", ours), ("ours_recompute", ours_recompute), ("fla_gdn", fla_gdn),
                             ("fla_kla", fla_kla)):
                try:
                    row[f"{name}_ms"] = round(timer(fn, inputs), 4)
                except Exception as e:  # keep the table going if a peer fails; say why
                    row[f"{name}_ms"] = None
                    print(f"{name} {shape} {op} failed: {type(e).__name__}: {e}", flush=True)
            row["floor_ms"] = round(floor_ms(B, T, H, K, V, op), 4)
            row["ours_floor_fraction"] = round(row["floor_ms"] / row["ours_ms"], 3) if row["ours_ms"] else None
            gdn = row["fla_gdn_ms"]
            for name in ("ours", "ours_recompute"):
                ms = row[f"{name}_ms"]
                row[f"{name}_speedup_vs_fla_gdn"] = round(gdn / ms, 2) if gdn and ms else None
            print(json.dumps(row), flush=True)
            rows.append(row)
            save()
        del inputs
        torch.cuda.empty_cache()


def decode_rows(batches, rows, save, H=12, K=96, V=192):
    """Per batch: eager calls (do_bench: what a Python loop pays, launch overhead included) and CUDA-graph
    replays (do_bench_cudagraph: GPU time only, as serving engines run decode)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    for batch in batches:
        q, k, v, g, eta = make_inputs(batch, 1, H, K, V, requires_grad=False)
        pool = torch.randn(batch, H, K, V, device="cuda") * 0.1
        slots = torch.arange(batch, device="cuda")
        calls = {
            "ours": lambda: fused_recurrent_kla(q, k, v, g, eta, initial_state=pool, state_indices=slots),
            "fla": lambda: fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=eta, initial_state=pool,
                                                            output_final_state=True, use_qk_l2norm_in_kernel=True),
        }
        floor = batch * H * K * V * 4 * 2 / BANDWIDTH * 1e3  # the fp32 state read and written
        row = {"batch": batch, "floor_ms": round(floor, 4)}
        for name, call in calls.items():
            row[f"{name}_eager_ms"] = round(do_bench(call, warmup=25, rep=150, return_mode="median"), 4)
            row[f"{name}_graph_ms"] = round(do_bench_cudagraph(call, rep=100, return_mode="median"), 4)
        for mode in ("eager", "graph"):
            row[f"speedup_vs_fla_{mode}"] = round(row[f"fla_{mode}_ms"] / row[f"ours_{mode}_ms"], 2)
        row["ours_graph_floor_fraction"] = round(floor / row["ours_graph_ms"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        save()


def print_tables(result):
    print(f"\n{result['device']}  {result['date']}")
    print(f"{'shape':28} {'op':8} {'ours':>8} {'recomp.':>8} {'fla_gdn':>8} {'fla_kla':>8} {'floor':>7} "
          f"{'floor/ours':>10} {'vs GDN':>7} {'recomp. vs GDN':>14}")
    fmt = lambda x: f"{x:8.3f}" if x is not None else f"{'-':>8}"
    for r in result["rows"]:
        print(f"{r['shape']:28} {r['op']:8} {fmt(r['ours_ms'])} {fmt(r['ours_recompute_ms'])} {fmt(r['fla_gdn_ms'])} "
              f"{fmt(r['fla_kla_ms'])} {r['floor_ms']:7.3f} {r['ours_floor_fraction'] or 0:10.2f} "
              f"{r['ours_speedup_vs_fla_gdn'] or 0:6.2f}x {r['ours_recompute_speedup_vs_fla_gdn'] or 0:13.2f}x")
    print(f"\n{'decode batch':12} {'ours eager':>10} {'fla eager':>10} {'vs fla':>7} {'ours graph':>10} "
          f"{'fla graph':>10} {'vs fla':>7} {'floor':>7} {'floor/ours graph':>16}")
    for r in result["decode"]:
        print(f"{r['batch']:12} {r['ours_eager_ms']:10.4f} {r['fla_eager_ms']:10.4f} {r['speedup_vs_fla_eager']:6.2f}x "
              f"{r['ours_graph_ms']:10.4f} {r['fla_graph_ms']:10.4f} {r['speedup_vs_fla_graph']:6.2f}x "
              f"{r['floor_ms']:7.4f} {r['ours_graph_floor_fraction']:16.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/kernels.json")
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                        help="B,T,H,K,V;... (default: the paper's 0.4B layer, B4 T8192 H16 K128 V128, B1 T65536)")
    parser.add_argument("--decode-batches", default=",".join(map(str, DECODE_BATCHES)), help="'' skips decode")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes.split(";") if shape]
    batches = [int(x) for x in args.decode_batches.split(",") if x]
    unlock_fla_backward()
    torch.manual_seed(0)
    print(f"benchmarking on {torch.cuda.get_device_name()}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "rows": [],
              "decode": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every row, so a run cut short keeps what it measured
        out.write_text(json.dumps(result, indent=1) + "\n")

    chunk_rows(shapes, result["rows"], save)
    decode_rows(batches, result["decode"], save)
    print_tables(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
