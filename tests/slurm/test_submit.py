"""slurm/submit.sh: the nodes and tasks come from the config's layout, a chain waits job after job, and a
layout that cannot fit is refused on the login node, before anything queues. The jobs are submitted held
(`-- --hold`) and cancelled: what is checked is what Slurm was asked for."""

import re

from conftest import ROOT


def test_submit_asks_for_the_layouts_nodes_and_chains_jobs(cluster, corpus, tmp_path):
    out = cluster.command(
        "bash", "slurm/submit.sh", "configs/tiny.toml", "--chain", "2", "parallel.data=2",
        f'data.manifest="{corpus["manifest"]}"', f'output_dir="{tmp_path / "run"}"',
        "--", "--hold", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
        env={"GPUS_PER_NODE": "1"}, timeout=120,
    )
    ids = re.findall(r"^submitted job (\d+): configs/tiny.toml on 2 node\(s\) x 1 task\(s\)", out.stdout, re.M)
    try:
        assert len(ids) == 2, out.stdout + out.stderr
        first, second = (cluster.job(job_id) for job_id in ids)
        assert (first["NumNodes"], first["NumTasks"]) == ("2-2", "2"), first  # pending: min-max nodes
        assert first["Command"] == str(ROOT / "slurm" / "pretrain_kla.sh"), first
        assert second["Dependency"].startswith(f"afterok:{ids[0]}"), second
    finally:
        cluster.command("scancel", *ids, check=False)


def test_submit_refuses_a_layout_that_cannot_fit_before_queueing(cluster, corpus, tmp_path):
    before = set(cluster.job_ids())
    out = cluster.command(
        "bash", "slurm/submit.sh", "configs/kla_7b.toml", "parallel.tensor=1", "parallel.sequence_parallel=false",
        "parallel.data=8", f'data.manifest="{corpus["manifest"]}"', f'output_dir="{tmp_path / "run"}"',
        env={"GPU_MEMORY": "80"}, check=False, timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this layout needs about" in errors[0], out.stderr
    assert set(cluster.job_ids()) == before
