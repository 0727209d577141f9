"""slurm/pretrain_kla.sh on two Slurm nodes (tests/slurm/conftest.py starts them).

1. `sbatch --nodes=2` of the template without CONFIG (the README's main job: the embedded corpus and
   configs/tiny.toml), one task a node: the ranks check their input once, train data-parallel over
   gloo across the nodes, checkpoint from both, write TensorBoard events, and every step's loss equals
   a single process training the same global batch (2e-5 relative: fp32 reduction order).
2. Preemption: USR1 to the batch shell (what --signal=B:USR1@300 sends before the time limit) makes
   both ranks checkpoint at the end of a step and the script requeue the job; it comes back with
   SLURM_RESTART_COUNT=1, resumes on both nodes, and its TensorBoard directory then holds every step
   once, each equal to the uninterrupted run's loss (1e-6).
3. Launchers inside an allocation: srun's tasks take their ranks from Slurm and the first node's
   NodeAddr as master (the node names do not resolve); mpiexec's ranks (MPICH's hydra, which starts
   its proxies through srun) take theirs from MPI although they inherit a one-task Slurm step's variables.
"""

import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SMALL, job_env, steps

STEPS = 40
RUN = [*SMALL, f"training.steps={STEPS}"]


def tensorboard_losses(run_dir: Path) -> list:
    """(step, loss) of every train/loss event in the run's TensorBoard directory, in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


@pytest.fixture(scope="module")
def two_node_run(cluster, tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    log = out_dir.parent / "job.out"
    job_id = cluster.submit(log, "--nodes=2", "--ntasks-per-node=1", args=[*RUN, "checkpoint.interval=20"],
                            env={"OUTPUT_DIR": str(out_dir)})
    final = cluster.finished(job_id, 360, log)
    return {"job": job_id, "final": final, "dir": out_dir, "log": log, "why": cluster.report(job_id, log)}


def test_two_nodes_train_like_one_process(two_node_run, tmp_path):
    run, why = two_node_run, two_node_run["why"]
    assert run["final"]["JobState"] == "COMPLETED" and run["final"].get("ExitCode") == "0:0", why
    text = run["log"].read_text(errors="replace")
    assert f"== job {run['job']} (restart 0): 2 tasks on 2 node(s) (klanode[1-2])" in text, why
    assert "preflight: tiny on 2 process(es)" in text, why
    assert "(slurm): TP 1 PP 1 CP 1 DP 2" in text, why
    assert sorted(steps(text)) == list(range(1, STEPS + 1)), why

    ckpt = run["dir"] / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:07d}", why
    final = ckpt / f"step_{STEPS:07d}"
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"], why
    two_nodes = dict(tensorboard_losses(run["dir"]))
    assert sorted(two_nodes) == list(range(1, STEPS + 1)), why

    # The same global batch (2 micro-batches of 2) on one process, without Slurm.
    single_dir = tmp_path / "single"
    command = [sys.executable, "-m", "pretrain", "--config", "configs/tiny.toml", f'output_dir="{single_dir}"',
               f'data.manifest="{run["dir"] / "data" / "manifest.json"}"', *RUN, "checkpoint.interval=0"]
    single = subprocess.run(command, cwd=ROOT, env=dict(job_env(), PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    assert "1 process(es) (single)" in single.stdout
    reference = dict(tensorboard_losses(single_dir))
    for step in range(1, STEPS + 1):
        assert abs(two_nodes[step] - reference[step]) <= 2e-5 * abs(reference[step]), (step, two_nodes[step], reference[step])


def test_preempted_two_node_job_requeues_and_resumes(cluster, two_node_run, tmp_path):
    out_dir, log = tmp_path / "run", tmp_path / "job.out"
    manifest = two_node_run["dir"] / "data" / "manifest.json"
    # checkpoint.interval beyond the run: the only checkpoints are the signal's and the last step's.
    job_id = cluster.submit(log, "--nodes=2", "--ntasks-per-node=1", args=[*RUN, "checkpoint.interval=1000"],
                            env={"OUTPUT_DIR": str(out_dir), "DATA_MANIFEST": str(manifest)})
    read = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731

    # A few steps in, Slurm's warning: USR1 to the batch shell only, as --signal=B:USR1@300 sends it.
    cluster.wait(lambda: len(steps(read())) >= 3, 240, "3 training steps in the job log", job_id, log)
    assert cluster.job(job_id).get("JobState") == "RUNNING", cluster.report(job_id, log)
    cluster.command("scancel", "--signal=USR1", "--batch", job_id)

    stopped = cluster.wait(lambda: re.search(r"^stopping at step (\d+) on a signal", read(), re.M), 90,
                           "the trainer to stop on the signal", job_id, log)
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < STEPS, cluster.report(job_id, log)
    ckpt = out_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{stop_step:07d}", cluster.report(job_id, log)
    assert sorted(p.name for p in (ckpt / f"step_{stop_step:07d}" / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]

    # The script requeued the job: it waits in the queue (BeginTime, ~2 minutes) with one restart.
    state = cluster.wait(lambda: (j := cluster.job(job_id)).get("JobState") == "PENDING" and j.get("Restarts") == "1" and j,
                         60, "the job to be requeued (PENDING, Restarts=1)", job_id, log)
    assert state.get("Reason") in ("BeginTime", "None", "Priority", "Resources"), cluster.report(job_id, log)
    # Release it early, but only once both nodes have finished the first run: slurmd revokes the job's
    # credential when the requeue kills it (second resolution), and a relaunch within that second, or
    # while a node is still completing, is refused ("Job credential revoked") or killed by the late
    # cleanup of the first run. The ~2 minute BeginTime hold normally covers this.
    cluster.wait(cluster.nodes_idle, 60, "the nodes to be idle after the requeue", job_id, log)
    time.sleep(2)
    cluster.command("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    final = cluster.finished(job_id, 300, log)
    text = read()
    why = cluster.report(job_id, log)
    assert final["JobState"] == "COMPLETED" and final.get("ExitCode") == "0:0", why
    first, _, second = text.partition(f"== job {job_id} (restart 1): 2 tasks on 2 node(s)")
    assert second, f"no '(restart 1)' line: the requeued run did not see SLURM_RESTART_COUNT=1{why}"
    assert "== USR1 before the time limit: checkpointing, then requeueing job" in first, why
    assert f"resumed from {ckpt / f'step_{stop_step:07d}'} at step {stop_step}" in second, why
    assert sorted(steps(first)) == list(range(1, stop_step + 1)), why
    assert sorted(steps(second)) == list(range(stop_step + 1, STEPS + 1)), why
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS:07d}", why

    # One TensorBoard directory for the run: both parts, every step once, the uninterrupted curve.
    logged = tensorboard_losses(out_dir)
    assert sorted(step for step, _ in logged) == list(range(1, STEPS + 1)), why
    uninterrupted = dict(tensorboard_losses(two_node_run["dir"]))
    for step, loss in logged:
        assert abs(loss - uninterrupted[step]) <= 1e-6 * abs(uninterrupted[step]), (step, loss, uninterrupted[step])


def test_ranks_under_srun_and_under_mpiexec_in_an_allocation(cluster, tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec beside {sys.executable} (pip install mpich mpi4py)")
    # one write a line: the ranks share the output file
    show = ("import sys; from pretrain.distributed import launch_env; "
            "sys.stdout.write(f'launch {tuple(vars(launch_env()).values())}\\n')")
    script = tmp_path / "launchers.sh"
    script.write_text(
        "#!/bin/bash\nset -e\ncd " + str(ROOT) + "\nexport PYTHONPATH=" + str(ROOT) + "\n"
        f'echo "== srun"; srun "$PYTHON" -c "{show}"\n'
        f'echo "== mpiexec"; {mpiexec} -n 2 "$PYTHON" -c "{show}"\n'
    )
    log = tmp_path / "job.out"
    job_id = cluster.submit(log, "--nodes=2", "--ntasks-per-node=1", script=script)
    final = cluster.finished(job_id, 180, log)
    why = cluster.report(job_id, log)
    assert final["JobState"] == "COMPLETED", why
    text = log.read_text()
    srun_part, _, mpi_part = text.partition("== mpiexec")

    def parsed(part):
        return sorted(ast.literal_eval(m) for m in re.findall(r"^launch (\(.*\))$", part, re.M))

    port = 20000 + int(job_id) % 20000
    assert parsed(srun_part) == [(0, 2, 0, "127.0.0.1", port, "slurm"), (1, 2, 0, "127.0.0.1", port, "slurm")], why
    mpi = parsed(mpi_part)
    assert [(r[0], r[1], r[5]) for r in mpi] == [(0, 2, "mpi"), (1, 2, "mpi")], why
    assert len({(r[3], r[4]) for r in mpi}) == 1, f"the MPI ranks disagree on the master{why}"
