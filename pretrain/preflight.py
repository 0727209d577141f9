"""The checks of a Slurm job before it starts its tasks, run once in the batch shell (and by
slurm/submit.sh before it submits): bad input fails the job in seconds, with one line in its output
file, instead of in every task or after hours in the queue.

    python -m pretrain.preflight --config C [--gpus N] [--gpu-memory GIB] [section.key=value ...]
    python -m pretrain.preflight --config C --nodes-for GPUS_PER_NODE [...]   # prints "NODES TASKS_PER_NODE"

It runs everything `python -m pretrain --resume` checks at start-up for N processes (config, layout
against the process count, data, tokenizer, a writable output dir, the memory estimate against this
node's GPU or --gpu-memory, and that a checkpoint to resume holds the same model), then that the job
gives one task per GPU; it prints a summary and, last, `output_dir=PATH` for the script to probe from
every node (an output dir must be shared).
"""

import argparse
import os
import re
import sys
from pathlib import Path

GIB = 2**30


def layout_world_size(config) -> int:
    """The GPU count a config's layout names: tensor x pipeline x context x data."""
    from pretrain.config import ConfigError

    p = config.parallel
    if p.data < 1:
        raise ConfigError("the config does not name its data-parallel size; set parallel.data so that its layout names a GPU count")
    return p.tensor * p.pipeline * p.context * p.data


def nodes_for(config, gpus_per_node: int) -> tuple:
    """(nodes, tasks per node) that run the config's layout with one task per GPU."""
    from pretrain.config import ConfigError

    world = layout_world_size(config)
    if world <= gpus_per_node:
        return 1, world
    if world % gpus_per_node:
        raise ConfigError(
            f"the layout needs {world} GPUs, not a whole number of {gpus_per_node}-GPU nodes; change parallel.data"
        )
    return world // gpus_per_node, gpus_per_node


def tasks_on_this_node() -> int:
    """This node's task count from SLURM_TASKS_PER_NODE (e.g. "8(x2)" or "8,4")."""
    nodes = os.environ.get("SLURM_TASKS_PER_NODE", "")
    node_id = int(os.environ.get("SLURM_NODEID", 0))
    counts = []
    for part in nodes.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else 0


def check_one_task_per_gpu() -> None:
    import torch

    from pretrain.config import ConfigError

    tasks, gpus = tasks_on_this_node(), torch.cuda.device_count()
    if torch.cuda.is_available() and tasks > gpus:
        raise ConfigError(
            f"{tasks} tasks on a node where {gpus} GPU(s) are visible: training runs one task per GPU; "
            f"submit with --ntasks-per-node={gpus} --gpus-per-node={gpus} (slurm/submit.sh does)"
        )


def main(argv=None) -> int:
    import kla_megatron  # noqa: F401  (first: it silences megatron-core's import noise)
    import torch

    from pretrain import checkpoint
    from pretrain.config import ConfigError, load_config
    from pretrain.estimate import PAPER_VOCAB, check_fits, estimate, vocab_size_of, world_size_of
    from pretrain.resume import check_resume
    from pretrain.train import check_config

    parser = argparse.ArgumentParser(prog="python -m pretrain.preflight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file (see configs/)")
    parser.add_argument("--gpus", type=int, help="process count (default: SLURM_NTASKS, WORLD_SIZE, or the config's layout)")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="check the memory estimate against a GPU of this size where no GPU is visible")
    parser.add_argument("--nodes-for", type=int, metavar="GPUS_PER_NODE",
                        help="check the config's layout (parallel.data set) and print the nodes and tasks per node it needs")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.nodes_for:
            nodes, per_node = nodes_for(config, args.nodes_for)
            world = nodes * per_node
        else:
            world = world_size_of(config, args.gpus)
        # On a login node (--nodes-for) the run is checked for the GPU nodes it will get; in a job, for this
        # node, whose GPU (if any) the memory check also uses.
        model, _, _ = check_config(config, world, gpus=True if args.nodes_for else None)
        latest = checkpoint.latest_checkpoint(Path(config.output_dir) / "checkpoints")
        if latest is not None:  # the job always resumes
            check_resume(latest, model, config.training)
        vocab = vocab_size_of(config) or PAPER_VOCAB
        if args.gpu_memory and not torch.cuda.is_available():
            check_fits(config, world, vocab, int(args.gpu_memory * GIB), f"a GPU of {args.gpu_memory:g} GiB")
        if not args.nodes_for:
            check_one_task_per_gpu()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    peak = estimate(config, world, vocab).peak
    if args.nodes_for:
        print(nodes, per_node)
        return 0
    print(f"preflight: {config.model.name} on {world} process(es), about {peak / GIB:.1f} GiB per GPU estimated; "
          f"config, data, tokenizer and output dir checked")
    print(f"output_dir={Path(config.output_dir).resolve()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
