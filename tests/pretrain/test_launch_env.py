"""Which launcher started a process, from its environment alone (and how many tasks Slurm put on a node): mpirun/mpiexec (with or without a Slurm
allocation around it) or srun (with or without --mpi). The launchers that run here are tested for real
(tests/pretrain/test_launchers.py, tests/slurm/test_sbatch.py); these are the environments of the ones
that do not: Open MPI's mpirun and srun's PMI plugins."""

import pytest

from pretrain.distributed import _launched_by_mpirun

SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(
    "env, mpirun",
    [
        (SRUN, False),
        ({**SRUN, "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "5"}, False),  # srun --mpi=pmi2
        ({**SRUN, "PMIX_RANK": "1"}, False),  # srun --mpi=pmix
        ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, True),  # MPICH's mpiexec
        # MPICH's mpiexec inside an allocation: its proxies run as a one-task srun step (seen in tests/slurm)
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, True),
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, True),
        ({"PMIX_RANK": "0"}, True),  # a PMIx launcher without Slurm
        ({}, False),
    ],
)
def test_mpirun_or_srun(env, mpirun):
    assert _launched_by_mpirun(env) is mpirun


@pytest.mark.parametrize("tasks_per_node, node, expected", [("8(x2)", 1, 8), ("8(x2),4", 2, 4), ("2", 0, 2), ("", 0, 0)])
def test_tasks_on_this_node(monkeypatch, tasks_per_node, node, expected):
    from pretrain.preflight import tasks_on_this_node

    monkeypatch.setenv("SLURM_TASKS_PER_NODE", tasks_per_node)
    monkeypatch.setenv("SLURM_NODEID", str(node))
    assert tasks_on_this_node() == expected
