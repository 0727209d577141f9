"""Context parallelism (issue 11) on 2 GPUs: parity and per-layer speed of the recurrence, and whole kla-0.4b
training steps, CP=2 against one GPU. Both parts merge into bench/results/context_parallel.json.

    torchrun --nproc_per_node 2 bench/context_parallel.py layer [--tokens 65536,131072,262144]
    python bench/context_parallel.py train --data-manifest M [--seqs 65536,131072] [--longest 1048576,524288,262144]

layer: one KLA layer (B1 H12 K96 V192, bf16 q, k, v, fp32 gates).
  parity  chunk_kla_context_parallel (each rank its half) against chunk_kla on the whole sequence on each GPU,
          without and with packed documents that cross the ranks' boundary: the norm-wise relative error of the
          outputs and of the q, k, v, g, eta gradients (the largest of them), over the whole sequence
  speed   fwd and fwd+bwd of
    ours_1gpu  chunk_kla on the whole sequence, on rank 0 alone (rank 1 waits)
    ours_cp2   chunk_kla_context_parallel, each rank its half; the ranks exchange state summaries only
    fla_1gpu   fla's chunk_gated_delta_rule (GDN, use_qk_l2norm_in_kernel=True) on the whole sequence
    fla_cp2    the same with fla's cp_context (fla/ops/cp), each rank its half
  Times are means over a fixed number of iterations between CUDA events, the same count on both ranks (a timer
  that chooses its own repetitions would let the ranks' collectives fall out of step); a CP time is the slower
  rank's. fla is needed only here; under Triton < 3.7.1 its gated backward is unlocked for timing only
  (bench/kernels.py).
train: the real trainer (bench/pretrain.py) on kla-0.4b, one sequence a step, full activation recompute, bf16:
  speed   the median step time at each of --seqs tokens on one GPU (CP=1) and on two (CP=2)
  longest the longest of --longest that trains a few steps at CP=2 (tried longest first; start-up refusals and
          out-of-memory failures are recorded with their reason)
"""

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.kernels import fla_gdn, make_inputs, unlock_fla_backward  # noqa: E402
from bench.pretrain import merge_results, run_trainer  # noqa: E402
from kernels import chunk_kla, chunk_kla_context_parallel, local_documents  # noqa: E402

OUT = "bench/results/context_parallel.json"
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


def parity(T, group, varlen):
    """CP over `group` against chunk_kla on the whole sequence: norm-wise relative errors over all T tokens."""
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(1)  # the same sequence and cotangent on every rank
    whole = make_inputs(1, T, H, K, V)
    do = torch.randn(1, T, H, V, device="cuda", dtype=torch.bfloat16)
    docs = (0, T // 3, T // 2 + 1000, T - 77, T) if varlen else None  # the second document spans both ranks
    o = chunk_kla(*whole, cu_seqlens=None if docs is None else torch.tensor(docs, device="cuda"))[0]
    reference = [o, *torch.autograd.grad(o, whole, do)]
    start, end = rank * T // ranks, (rank + 1) * T // ranks
    half = [x.detach()[:, start:end].contiguous().requires_grad_() for x in whole]
    options = {}
    if docs is not None:
        offsets, continues = local_documents(docs, start, end)
        options = dict(cu_seqlens=offsets.cuda(), first_document_continues=continues)
    o_cp = chunk_kla_context_parallel(*half, group=group, **options)
    ours = [o_cp, *torch.autograd.grad(o_cp, half, do[:, start:end])]
    errors = []
    for ref, got in zip(reference, ours):
        ref = ref[:, start:end].float()
        sums = torch.stack([(got.float() - ref).square().sum(), ref.square().sum()])
        dist.all_reduce(sums, group=group)
        errors.append((sums[0] / sums[1]).sqrt().item())
    return {"cp": ranks, "tp": 1, "seq": T, "varlen": varlen, "max_rel_err_out": errors[0],
            "max_rel_err_grad": max(errors[1:])}


def print_layer_table(result):
    print(f"\nparity, CP={result['ranks']} against one GPU (relative error over the whole sequence)")
    for r in result["parity"]:
        print(f"  {r['seq']:8} tokens{' packed documents' if r['varlen'] else '':18} outputs {r['max_rel_err_out']:.2e}"
              f"  gradients {r['max_rel_err_grad']:.2e}")
    print(f"\n{result['device']} x {result['ranks']}  {result['date']}  (B1 H{H} K{K} V{V} bf16; ms)")
    print(f"{'tokens':>8} {'op':8} {'ours 1':>8} {'ours CP2':>8} {'speedup':>7} {'fla 1':>8} {'fla CP2':>8} "
          f"{'speedup':>7} {'ours CP2 vs fla CP2':>19}")
    fmt = lambda x, w=8: f"{x:{w}.3f}" if x is not None else f"{'-':>{w}}"
    for r in result["layer"]:
        print(f"{r['tokens']:8} {r['op']:8} {fmt(r['ours_1gpu_ms'])} {fmt(r['ours_cp2_ms'])} "
              f"{fmt(r['ours_cp2_speedup'], 6)}x {fmt(r['fla_1gpu_ms'])} {fmt(r['fla_cp2_ms'])} "
              f"{fmt(r['fla_cp2_speedup'], 6)}x {fmt(r['ours_cp2_vs_fla_cp2'], 18)}x")
    print(f"communication per rank and call: {result['bytes_forward']} B forward, {result['bytes_backward']} B backward")


def layer(args):
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    try:
        unlock_fla_backward()
    except ImportError:
        print("fla is not importable: its columns stay empty", flush=True)
    group = dist.group.WORLD
    tokens = [int(x) for x in args.tokens.split(",")]
    result = {"device": torch.cuda.get_device_name(), "ranks": dist.get_world_size(),
              "date": datetime.date.today().isoformat(), "shape": f"B1 H{H} K{K} V{V} bf16",
              "bytes_forward": H * K * (K + V) * 4, "bytes_backward": H * K * V * 4,
              "parity": [parity(tokens[0], group, varlen) for varlen in (False, True)], "layer": []}
    out = Path(args.out)
    if dist.get_rank() == 0:
        merge_results(result, out)
        print(f"parity: {result['parity']}", flush=True)
    for T in tokens:
        if dist.get_rank() == 0:
            print(f"{T} tokens", flush=True)
        result["layer"] += rows_for(T, group)
        if dist.get_rank() == 0:  # after every length, so a run cut short keeps what it measured
            merge_results(result, out)
    if dist.get_rank() == 0:
        print_layer_table(result)
        print(f"wrote {out}")
    dist.destroy_process_group()


def train_step(seq, cp, manifest, steps):
    """One trainer run of kla-0.4b at `seq` tokens a step over `cp` GPUs: (median step ms, peak GiB)."""
    overrides = [f"data.manifest={manifest}", f"data.seq_length={seq}", "training.micro_batch_size=1",
                 "training.global_batch_size=1", "training.recompute=true", f"training.steps={steps}",
                 "training.warmup_steps=1", "logging.interval=1", f"parallel.context={cp}", "parallel.data=0"]
    run = run_trainer("configs/kla_0.4b.toml", overrides, skip=min(2, steps - 1), nproc=cp)
    step_ms = [seq / x * 1000 for x in run["series"]["tokens_per_s"][min(2, steps - 1):]]
    return round(statistics.median(step_ms), 1), round(run["peak_memory_gib"], 2)


def train(args):
    out = Path(args.out)
    speed = []
    for seq in (int(x) for x in args.seqs.split(",") if x):
        row = {"seq": seq}
        for cp in (1, 2):
            try:
                row[f"cp{cp}_ms"], row[f"cp{cp}_peak_gib"] = train_step(seq, cp, args.data_manifest, args.steps)
            except subprocess.CalledProcessError as e:
                row[f"cp{cp}_ms"], row[f"cp{cp}_error"] = None, f"exit {e.returncode} (see the log above)"
        row["speedup"] = round(row["cp1_ms"] / row["cp2_ms"], 2) if row["cp1_ms"] and row["cp2_ms"] else None
        speed.append(row)
        merge_results({"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "speed": speed}, out)
        print(f"{seq} tokens: CP=1 {row['cp1_ms']} ms, CP=2 {row['cp2_ms']} ms, speedup {row['speedup']}x", flush=True)
    tried = []
    for seq in (int(x) for x in args.longest.split(",") if x):
        try:
            step_ms, peak = train_step(seq, 2, args.data_manifest, 3)
            tried.append({"seq": seq, "cp2_ms": step_ms, "peak_gib": peak})
            break
        except subprocess.CalledProcessError as e:
            tried.append({"seq": seq, "error": f"exit {e.returncode} (see the log above)"})
    longest = next((t["seq"] for t in tried if "error" not in t), None)
    merge_results({"longest_seq_cp2": longest, "longest_tried": tried}, out)
    print("\n| seq | CP=1 ms | CP=2 ms | speedup | peak GiB CP=1 / CP=2 |\n|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['seq']} | {r['cp1_ms']} | {r['cp2_ms']} | {r['speedup']}x | {r.get('cp1_peak_gib')} / "
              f"{r.get('cp2_peak_gib')} |")
    print(f"longest sequence of kla-0.4b trained at CP=2 (recompute): {longest}; tried {tried}\nwrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layer", help="under torchrun on 2 GPUs: parity and per-layer speed beside fla")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="total sequence lengths (parity: the first)")
    p.add_argument("--out", default=OUT)
    p = sub.add_parser("train", help="whole kla-0.4b steps, CP=1 on one GPU and CP=2 on two")
    p.add_argument("--data-manifest", required=True, help="a data_prep manifest at vocabulary 32000")
    p.add_argument("--seqs", default="65536,131072")
    p.add_argument("--longest", default="1048576,524288,262144")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=OUT)
    args = parser.parse_args()
    layer(args) if args.command == "layer" else train(args)


if __name__ == "__main__":
    main()
