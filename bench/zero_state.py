"""What ZeRO's training state costs per GPU, at one and at two data-parallel ranks: the bytes of the
fp32 master weights and AdamW moments each rank holds, its peak memory over one bf16 training step,
and how long a checkpoint of that state pauses training (asynchronous save) and takes to commit.

    python bench/zero_state.py --model kla-0.4b            # 2 GPUs; spawns 1, then 2 processes
    python bench/zero_state.py --model tiny --seq 64        # a smoke test on CPU (no memory figures)

Prints a table and writes bench/results/zero_state_<model>_zero<stage>.json.
"""

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(rank: int, world_size: int, port: int, args, checkpoints: str, out: str):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kla_megatron import build_model_chunks, named_model, transformer_config
    from pretrain import checkpoint, zero
    from pretrain.config import load_config
    from pretrain.cpu import cuda_bookkeeping_on_cpu
    from pretrain.distributed import init_distributed, launch_env
    from pretrain.layout import ParallelLayout
    from pretrain.train import forward_step, seed_everything

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = load_config(None, [f"parallel.zero_stage={args.zero_stage}", "training.micro_batch_size=1",
                                f"training.global_batch_size={2 * world_size}"])
    model_config = named_model(args.model)
    cuda = torch.cuda.is_available()
    groups = init_distributed(launch_env(), ParallelLayout.build(config.parallel, model_config, world_size, cuda, args.seq))
    seed_everything(0)
    tf_config = transformer_config(model_config, params_dtype=torch.bfloat16, use_cpu_initialization=not cuda)
    model = build_model_chunks(model_config, tf_config, args.vocab, args.seq, groups)
    engine = zero.initialize(model, config, bf16=True, groups=groups)
    tf_config.no_sync_func = partial(zero.accumulating, engine)
    tokens = torch.randint(0, args.vocab, (1, args.seq + 1), generator=torch.Generator().manual_seed(rank))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, args.seq),
             "position_ids": torch.arange(args.seq)[None]}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with cuda_bookkeeping_on_cpu():
        get_forward_backward_func()(forward_step_func=partial(forward_step, engine, groups, False),
                                    data_iterator=iter([batch] * 2), model=list(engine.module.chunks),
                                    num_microbatches=2, seq_length=args.seq, micro_batch_size=1, forward_only=False)
    zero.finish_gradients(engine, groups)
    engine.step()
    row = {
        "dp": world_size,
        "zero_stage": args.zero_stage,
        "optimizer": type(engine.optimizer).__name__,
        "optimizer_state_gib": zero.optimizer_state_bytes(engine) / 2**30,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }
    checkpointer = checkpoint.Checkpointer(Path(checkpoints), keep=1, asynchronous=True)
    started = time.perf_counter()
    checkpointer.save(1, engine, {"step": 1, "layout": {"dp": world_size}})
    row["save_pause_s"] = time.perf_counter() - started
    checkpointer.wait()
    row["save_commit_s"] = time.perf_counter() - started
    if rank == 0:
        Path(out).write_text(json.dumps(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="kla-0.4b")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpoint-dir", default=None, help="where the timed checkpoints go (default: the system's temp dir)")
    args = parser.parse_args()
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        print("needs 2 CUDA GPUs", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as tmp:
        for world_size in (1, 2):
            out = Path(tmp) / f"dp{world_size}.json"
            checkpoints = Path(tmp) / f"checkpoints_dp{world_size}"
            mp.start_processes(measure, args=(world_size, free_port(), args, str(checkpoints), str(out)),
                               nprocs=world_size, start_method="spawn")
            rows.append(json.loads(out.read_text()))
    print(f"{args.model}, bf16, ZeRO-{args.zero_stage}, per rank:")
    print(f"{'DP':>3} {'optimizer':>16} {'fp32 masters+moments GiB':>25} {'peak GiB':>9} {'save pause s':>13} {'save commit s':>14}")
    for r in rows:
        print(f"{r['dp']:>3} {r['optimizer']:>16} {r['optimizer_state_gib']:>25.3f} {r['peak_memory_gib']:>9.2f} "
              f"{r['save_pause_s']:>13.2f} {r['save_commit_s']:>14.2f}")
    print(f"DP=2 / DP=1 optimizer state: {rows[1]['optimizer_state_gib'] / rows[0]['optimizer_state_gib']:.4f}")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": datetime.date.today().isoformat(), "model": args.model,
              "seq_length": args.seq, "vocab": args.vocab, "rows": rows}
    path = ROOT / "bench" / "results" / f"zero_state_{args.model}_zero{args.zero_stage}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
