"""Process-group start from whatever launched us (torchrun, Slurm's srun, mpiexec, or nothing),
then megatron's parallel state.

Each launcher names rank, world size and local rank differently; `launch_env` reads them into one
`LaunchEnv` and exports the torch.distributed variables, so everything after it is launcher-blind.
"""

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return hosts.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def _mpi_world():
    """(rank, size, local_rank) from MPI, or None when not started by mpiexec."""
    if not any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")):
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return comm, comm.Get_rank(), comm.Get_size(), local.Get_rank()


def launch_env() -> LaunchEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a script that set them itself
        launcher = "torchrun"
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or _slurm_master_addr()
        # Same port on every task without talking: derived from the job id.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
    elif (mpi := _mpi_world()) is not None:
        launcher = "mpi"
        comm, rank, world, local = mpi
        addr, port = comm.bcast((socket.gethostname(), _free_port()) if rank == 0 else None, root=0)
    else:
        launcher, rank, world, local, addr, port = "single", 0, 1, 0, "127.0.0.1", _free_port()
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), MASTER_ADDR=addr, MASTER_PORT=str(port)
    )
    return LaunchEnv(rank, world, local, addr, port, launcher)


def init_distributed(env: LaunchEnv, layout) -> ProcessGroupCollection:
    """torch.distributed (NCCL on GPU, gloo on CPU) and megatron's TP/PP/CP/DP groups for `layout`
    (a pretrain.layout.ParallelLayout); returns them as megatron's ProcessGroupCollection, which the model,
    the optimizer, the data and the checkpoints are handed."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=env.rank, world_size=env.world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline if layout.virtual_pipeline > 1 else None,
        context_parallel_size=layout.context,
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
