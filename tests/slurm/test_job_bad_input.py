"""Bad input fails a Slurm job in its first seconds, with the reason on one line of the job's output
file and no traceback, before any training task starts: a missing dataset or tokenizer, a task count
that does not match the layout (tensor x pipeline x context x data), a layout the memory estimate
refuses, an output dir that cannot be written or that the job's nodes do not share.

All the jobs are submitted at once and run side by side on the two test nodes. Without Slurm, the
template's first step (the embedded corpus) refuses an unwritable OUTPUT_DIR on one line.
"""

import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPT, SMALL, job_env

# name: (sbatch options, environment, overrides, the reason expected in the output file)
CASES = {
    "missing dataset": (
        [], {}, ['data.train_prefixes=["/nonexistent/web_train"]'],
        "dataset /nonexistent/web_train.bin does not exist; write it with `python -m data_prep tokenize",
    ),
    "missing tokenizer": (
        [], {}, ['data.tokenizer="/nonexistent/tokenizer.model"'],
        "tokenizer /nonexistent/tokenizer.model does not exist",
    ),
    "task count does not match the layout": (
        ["--nodes=1", "--ntasks-per-node=2"], {}, ["parallel.data=4"],
        "2 process(es) give data-parallel size 2, but the layout is tensor=1 x pipeline=1 x context=1 x data=4 = 4 GPUs",
    ),
    "layout the estimate refuses": (
        [], {"GPU_MEMORY": "80"}, ["model.name=kla-7b", "data.seq_length=4096", "training.micro_batch_size=1"],
        "this layout needs about",
    ),
    "unwritable output dir": (
        [], {"OUTPUT_DIR": "{file}/run"}, [],
        "output_dir {file}/run is not writable (Not a directory); choose a directory you can write to",
    ),
    "output dir not shared between nodes": (
        ["--nodes=2", "--ntasks-per-node=1"], {"OUTPUT_DIR": "{node_local}/run"}, [],
        "does not see {node_local}/run/.nodes_see_this_{job}, which the first node wrote: the output dir is not shared",
    ),
}


@pytest.fixture(scope="module")
def failed_jobs(cluster, corpus, tmp_path_factory) -> dict:
    scratch = tmp_path_factory.mktemp("bad-input")
    not_a_dir = scratch / "a-file"
    not_a_dir.write_text("not a directory\n")
    jobs = {}
    for name, (options, env, overrides, message) in CASES.items():
        if "{node_local}" in env.get("OUTPUT_DIR", "") and not cluster.node_local_is_private:
            continue
        slug = re.sub(r"\W+", "-", name)
        fill = {"file": not_a_dir, "node_local": cluster.node_local}
        env = {"OUTPUT_DIR": str(scratch / slug), **{k: v.format(**fill) for k, v in env.items()},
               "CONFIG": "configs/tiny.toml", "DATA_MANIFEST": corpus["manifest"]}
        log = scratch / f"{slug}.out"
        job_id = cluster.submit(log, *(options or ["--nodes=1", "--ntasks-per-node=1"]), args=[*SMALL, "training.steps=2", *overrides], env=env)
        jobs[name] = (job_id, log, message.format(**fill, job=job_id))
    return {name: (cluster.finished(job_id, 240, log), log, message, cluster.report(job_id, log))
            for name, (job_id, log, message) in jobs.items()}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_the_job_in_seconds_with_one_line(cluster, failed_jobs, name):
    if name not in failed_jobs:
        pytest.skip("this machine cannot give a slurmd a private mount (unshare --mount), so both test nodes share every directory")
    final, log, message, why = failed_jobs[name]
    text = log.read_text(errors="replace")
    assert final["JobState"] == "FAILED" and final.get("ExitCode") == "2:0", why
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], f"expected one 'error: ...{message}...' line{why}"
    assert "Traceback" not in text and not re.search(r"^step ", text, re.M), why
    hours, minutes, seconds = map(int, final["RunTime"].split(":")[-3:])
    assert hours * 3600 + minutes * 60 + seconds < 120, f"the job took {final['RunTime']} to fail{why}"


def test_unwritable_output_dir_without_slurm_is_one_line(tmp_path):
    """The template's first step, the embedded corpus, names the directory it cannot write (no traceback)."""
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    env = dict(job_env(), OUTPUT_DIR=str(not_a_dir / "out"))
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"data_prep default-corpus: error: cannot use {not_a_dir / 'out'}: Not a directory"
    ], result.stderr
