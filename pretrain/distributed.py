"""Process-group start from whatever launched us (torchrun, Slurm's srun, mpirun/mpiexec, or nothing),
then megatron's parallel state.

Each launcher names rank, world size and local rank differently; `launch_env` reads them into one
`LaunchEnv` and exports the torch.distributed variables, so everything after it is launcher-blind:

  torchrun  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by torchrun, or by hand)
  srun      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first node of the step
            (`scontrol show hostnames`; its NodeAddr when the name does not resolve), the port derived
            from the job id, so every task of every node agrees without talking; MASTER_ADDR /
            MASTER_PORT in the environment win
  mpirun    hydra's MPI_LOCALRANKID (MPICH, Intel MPI) or Open MPI's OMPI_COMM_WORLD_*: ranks through
            mpi4py; rank 0 broadcasts its host name and a free port (MASTER_ADDR / MASTER_PORT win). An
            mpirun inside a Slurm allocation counts as MPI: its ranks inherit the SLURM_* variables of the
            step that runs MPI's own daemons (one task a node), which do not describe them.
"""

import atexit
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from pretrain.config import ConfigError

# Set only by an MPI launcher's own process manager (Open MPI's mpirun; MPICH's and Intel MPI's hydra
# mpiexec), never by srun, even with --mpi=pmi2 or pmix.
_MPIRUN_ONLY = ("OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")
_MPI_RANK = ("PMI_RANK", "PMIX_RANK")


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


def slurm_master_addr(env=os.environ) -> str:
    """The address of the first node of the job step, where rank 0 runs: its name, or the NodeAddr that
    slurm.conf gives it when the name does not resolve."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    try:
        first = _scontrol("show", "hostnames", nodelist).split()[0]
        try:
            socket.getaddrinfo(first, None)
            return first
        except socket.gaierror:
            return re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", first)).group(1)
    except (OSError, subprocess.SubprocessError, IndexError, AttributeError):
        if int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1) == 1:
            return "127.0.0.1"
        raise ConfigError(
            f"cannot find the address of the first node of {nodelist!r} with scontrol; "
            "put scontrol on the PATH of the compute nodes or export MASTER_ADDR (the first node's address)"
        ) from None


def _scontrol(*args) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def _launched_by_mpirun(env) -> bool:
    """mpirun/mpiexec started us, with or without Slurm around it."""
    return any(k in env for k in _MPIRUN_ONLY) or ("SLURM_PROCID" not in env and any(k in env for k in _MPI_RANK))


def _mpi_world(env):
    """(rank, size, local rank, master address, master port) through mpi4py."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank = comm.Get_rank()
    master = (env.get("MASTER_ADDR") or socket.gethostname(), int(env.get("MASTER_PORT") or _free_port())) if rank == 0 else None
    addr, port = comm.bcast(master, root=0)
    return rank, comm.Get_size(), local.Get_rank(), addr, port


def launch_env() -> LaunchEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a script that set them itself
        launcher = "torchrun"
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500))
    elif _launched_by_mpirun(env):
        launcher = "mpi"
        rank, world, local, addr, port = _mpi_world(env)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or slurm_master_addr(env)
        # Same port on every task without talking: derived from the job id.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
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
    atexit.register(release)  # whatever way the process ends (a no-op after shutdown())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline if layout.virtual_pipeline > 1 else None,
        context_parallel_size=layout.context,
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def shutdown() -> None:
    """The end of a run: every rank leaves together, then the process groups are destroyed."""
    if dist.is_initialized():
        dist.barrier()
    release()


def release() -> None:
    """Destroys the process groups without waiting for the other ranks (a peer may have failed), at the latest when
    the interpreter exits: with a group still alive then, gloo's worker threads can still hold tensors, and freeing
    them aborts the process (SIGABRT; pytorch/pytorch#179291)."""
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
