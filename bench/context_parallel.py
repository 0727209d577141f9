"""One KLA layer's recurrence on one GPU vs context parallelism over two (issue 11), beside fla's context
parallelism for GDN in the same run.

    torchrun --nproc_per_node 2 bench/context_parallel.py [--tokens 65536,131072,262144]
                                                          [--out bench/results/context_parallel_layer.json]

Per total sequence length (B1 H12 K96 V192, bf16 q, k, v, fp32 gates), fwd and fwd+bwd of:
  ours_1gpu  chunk_kla on the whole sequence, on rank 0 alone (rank 1 waits)
  ours_cp2   chunk_kla_context_parallel, each rank its half; the ranks exchange state summaries only
  fla_1gpu   fla's chunk_gated_delta_rule (GDN, use_qk_l2norm_in_kernel=True) on the whole sequence
  fla_cp2    the same with fla's cp_context (fla/ops/cp), each rank its half
Times are means over a fixed number of iterations between CUDA events, the same count on both ranks (a timer
that chooses its own repetitions would let the ranks' collectives fall out of step); a CP time is the slower
rank's. fla is needed only here; under Triton < 3.7.1 its gated backward is unlocked for timing only
(bench/kernels.py). Rank 0 prints the table and writes the JSON.
"""

import argparse
import datetime
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import fla_gdn, make_inputs, unlock_fla_backward  # noqa: E402
from kernels import chunk_kla, chunk_kla_context_parallel  # noqa: E402

H, K, V = 12, 96, 192
TOKENS = [65536, 131072, 262144]
WARMUP, ITERS = 3, 10


def mean_ms(step, barrier):
    """Mean ms of step() over ITERS after WARMUP; with barrier, all ranks start timing together."""
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    if barrier:
        dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / ITERS


def steps(call, inputs):
    """{op: a callable running it once} for fwd and fwd+bwd of call(*inputs) -> o."""
    do = torch.randn_like(inputs[2])

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        call(*inputs).backward(do)
    return {"fwd": lambda: call(*inputs), "fwd+bwd": fwd_bwd}


def timed(name, call, inputs, ranks):
    """{op: ms} of call on `ranks` (the slowest of them), None where it failed (the reason is printed)."""
    failed = 1e30  # above any time, so the maximum over ranks shows a failure anywhere
    times = {}
    for op, step in steps(call, inputs).items():
        ms = torch.tensor(-1.0, device="cuda")  # ranks that do not take part
        if dist.get_rank() in ranks:
            try:
                ms.fill_(mean_ms(step, barrier=len(ranks) > 1))
            except Exception as e:  # keep the table going if a peer fails; say why
                print(f"rank {dist.get_rank()}: {name} {op} failed: {type(e).__name__}: {e}", flush=True)
                ms.fill_(failed)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        times[op] = None if ms.item() >= failed else round(ms.item(), 3)
        torch.cuda.empty_cache()
    return times


def rows_for(T, group):
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)  # the same sequence on every rank
    whole = make_inputs(1, T, H, K, V)
    part = slice(rank * T // ranks, (rank + 1) * T // ranks)
    half = [x.detach()[:, part].contiguous().requires_grad_() for x in whole]

    def ours_cp(q, k, v, g, eta):
        return chunk_kla_context_parallel(q, k, v, g, eta, group=group)

    @functools.cache
    def fla_context():  # built once per length, as a training step builds it once for all layers
        from fla.ops.cp import build_cp_context
        return build_cp_context(torch.tensor([0, T], device="cuda"), group=group)

    def fla_cp(q, k, v, g, eta):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule(q, k, v, g, eta, use_qk_l2norm_in_kernel=True, cp_context=fla_context())[0]

    one_gpu = {0}
    both = set(range(ranks))
    results = {
        "ours_1gpu": timed("ours_1gpu", lambda *x: chunk_kla(*x)[0], whole, one_gpu),
        "ours_cp2": timed("ours_cp2", ours_cp, half, both),
        "fla_1gpu": timed("fla_1gpu", fla_gdn, whole, one_gpu),
        "fla_cp2": timed("fla_cp2", fla_cp, half, both),
    }
    rows = []
    for op in ("fwd", "fwd+bwd"):
        row = {"tokens": T, "op": op, **{f"{name}_ms": times[op] for name, times in results.items()}}
        for who in ("ours", "fla"):
            one, cp = row[f"{who}_1gpu_ms"], row[f"{who}_cp2_ms"]
            row[f"{who}_cp2_speedup"] = round(one / cp, 2) if one and cp else None
        row["ours_cp2_vs_fla_cp2"] = round(row["fla_cp2_ms"] / row["ours_cp2_ms"], 2) \
            if row["fla_cp2_ms"] and row["ours_cp2_ms"] else None
        rows.append(row)
    return rows


def print_table(result):
    print(f"\n{result['device']} x {result['ranks']}  {result['date']}  (B1 H{H} K{K} V{V} bf16; ms)")
    print(f"{'tokens':>8} {'op':8} {'ours 1':>8} {'ours CP2':>8} {'speedup':>7} {'fla 1':>8} {'fla CP2':>8} "
          f"{'speedup':>7} {'ours CP2 vs fla CP2':>19}")
    fmt = lambda x, w=8: f"{x:{w}.3f}" if x is not None else f"{'-':>{w}}"
    for r in result["rows"]:
        print(f"{r['tokens']:8} {r['op']:8} {fmt(r['ours_1gpu_ms'])} {fmt(r['ours_cp2_ms'])} "
              f"{fmt(r['ours_cp2_speedup'], 6)}x {fmt(r['fla_1gpu_ms'])} {fmt(r['fla_cp2_ms'])} "
              f"{fmt(r['fla_cp2_speedup'], 6)}x {fmt(r['ours_cp2_vs_fla_cp2'], 18)}x")
    print(f"communication per rank and call: {result['bytes_forward']} B forward, {result['bytes_backward']} B backward")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="total sequence lengths")
    parser.add_argument("--out", default="bench/results/context_parallel_layer.json")
    args = parser.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    try:
        unlock_fla_backward()
    except ImportError:
        print("fla is not importable: its columns stay empty", flush=True)
    group = dist.group.WORLD
    result = {"device": torch.cuda.get_device_name(), "ranks": dist.get_world_size(),
              "date": datetime.date.today().isoformat(), "shape": f"B1 H{H} K{K} V{V} bf16",
              "bytes_forward": H * K * (K + V) * 4, "bytes_backward": H * K * V * 4, "rows": []}
    out = Path(args.out)
    for T in (int(x) for x in args.tokens.split(",")):
        if dist.get_rank() == 0:
            print(f"{T} tokens", flush=True)
        result["rows"] += rows_for(T, group)
        if dist.get_rank() == 0:  # after every length, so a run cut short keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
    if dist.get_rank() == 0:
        print_table(result)
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
