"""slurm/pretrain_kla.sh under a real one-node Slurm: munged, slurmctld and slurmd started in a temp
dir for this module (Debian's slurm-wlm + munge; `bash .ci/install_slurm` installs them).

1. `sbatch --wait` of the template, overridden to 2 CPU tasks: both ranks train (DP 2 over gloo),
   checkpoint and write TensorBoard events, and the job exits 0.
2. Requeue: USR1 to the batch shell (what `--signal=B:USR1@300` sends before the time limit) makes the
   trainer checkpoint at the end of its step and the script `scontrol requeue` itself; the job comes
   back with SLURM_RESTART_COUNT=1, resumes from that checkpoint and finishes every step.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "pretrain_kla.sh"
MUNGE_KEY = Path("/etc/munge/munge.key")
BINARIES = ("sbatch", "srun", "scontrol", "scancel", "slurmctld", "slurmd", "munged")


def _which(name: str):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


_MISSING = [name for name in BINARIES if _which(name) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"Slurm is not installed ({', '.join(_MISSING)} not found): run `bash .ci/install_slurm`"
)

# A few CPU steps of configs/tiny.toml on the embedded default corpus (what the script uses without CONFIG).
SMALL = [
    "data.seq_length=64", "training.micro_batch_size=2", "training.global_batch_size=4",
    "training.warmup_steps=1", "eval.interval=0", "logging.interval=1",
]
# The template asks for 8 GPUs x 8 tasks x 12 CPUs; a 2-core machine without GPUs gets 2 tasks x 1 CPU.
# --time leaves the template's USR1@300 s warning far away; the test sends USR1 itself.
SBATCH_CPU = [
    "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
    "--time=30", "--job-name=kla-slurm-test",
]
STEP = re.compile(r"^step\s+(\d+)/(\d+) \| loss ", re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def _terminate(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Cluster:
    """One node (this machine) and one partition; every file the daemons write is under `self.dir`."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="kla-slurm-"))
        self.dir.chmod(0o755)  # munged runs as user munge and needs to reach its own subdir
        self.conf = self.dir / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        # Jobs see what a user's shell would pass: no launcher variables, and not the CPU switches that
        # tests/conftest.py sets for in-process tests (the script must run on a CPU node without them).
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "CONFIG", "DATA_MANIFEST", "NPROC", "DS_ACCELERATOR", "TRITON_INTERPRET"):
            self.env.pop(key, None)
        self.env["SLURM_CONF"] = str(self.conf)

    # -- daemons --------------------------------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            pytest.fail("tests/slurm starts slurmd with SlurmUser=root: run it as root (CI does)")
        if not MUNGE_KEY.is_file():
            pytest.fail(f"{MUNGE_KEY} is missing: run `bash .ci/install_slurm`")
        munge_dir = self.dir / "munge"
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # munged wants its socket directory searchable by all
        shutil.chown(munge_dir, "munge", "munge")
        socket_path = munge_dir / "munge.socket"
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", f"--socket={socket_path}", f"--key-file={MUNGE_KEY}",
             f"--log-file={munge_dir / 'munged.log'}", f"--pid-file={munge_dir / 'munged.pid'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
            user="munge", group="munge", extra_groups=[],
        )
        self._wait_for(lambda: socket_path.exists(), 15, "munged to open its socket")

        cpus = os.cpu_count() or 2
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir()
        self.conf.write_text(
            f"""\
ClusterName=klatest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
FirstJobId={1000 + os.getpid() % 18000}
KillWait=5
MessageTimeout=10
InactiveLimit=0
StateSaveLocation={self.dir / 'state'}
SlurmdSpoolDir={self.dir / 'spool'}
SlurmctldPidFile={self.dir / 'slurmctld.pid'}
SlurmdPidFile={self.dir / 'slurmd.pid'}
SlurmctldLogFile={self.dir / 'slurmctld.log'}
SlurmdLogFile={self.dir / 'slurmd.log'}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_for(self.node_idle, 60, f"node {self.node} to be idle")

    def _spawn(self, name: str, argv: list, **kwargs) -> None:
        with open(self.dir / f"{name}.out", "wb") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, **kwargs)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.daemon_logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{self.daemon_logs()}")
            time.sleep(0.5)

    def node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then end anything still running under this cluster's
        slurm.conf (slurmstepd and job processes inherit SLURM_CONF from slurmd / sbatch)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.job_ids()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env, capture_output=True, timeout=20)
                deadline = time.monotonic() + 30
                while self._running_jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.procs:
                _terminate(self.procs[name])
        for pid in self._leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def _leftovers(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def job_ids(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=20)
        return out.stdout.split()

    def _running_jobs(self) -> bool:
        out = subprocess.run(["squeue", "-h", "-t", "R,CG,S", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=20)
        return bool(out.stdout.split())

    def daemon_logs(self) -> str:
        parts = []
        for name in ("munged.out", "munge/munged.log", "slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n{_tail(path, 30)}")
        return "\n".join(parts)

    # -- jobs -----------------------------------------------------------------------------------
    def command(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(argv), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` exited with {out.returncode}:\n{out.stdout}{out.stderr}\n{self.daemon_logs()}")
        return out

    def sbatch_argv(self, output_dir: Path, log: Path, overrides: list, *options: str, **env_extra: str) -> tuple[list, dict]:
        env = dict(self.env, OUTPUT_DIR=str(output_dir), PYTHON=sys.executable, PYTHONUNBUFFERED="1", **env_extra)
        # From the repository root: the script finds the checkout through SLURM_SUBMIT_DIR.
        return ["sbatch", *SBATCH_CPU, f"--output={log}", *options, str(SCRIPT), *overrides], env

    def job(self, job_id: str) -> dict:
        out = self.command("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def report(self, job_id, log: Path) -> str:
        info = self.command("scontrol", "show", "job", job_id, check=False).stdout if job_id else ""
        return f"\n--- job log {log}\n{_tail(log, 150)}\n--- scontrol show job {job_id}\n{info}\n{self.daemon_logs()}"


@pytest.fixture(scope="module")
def corpus() -> dict:
    """The embedded corpus that the first job prepared (manifest path), for later jobs to reuse."""
    return {}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _wait(condition, timeout: float, what: str, cluster: Cluster, job_id, log: Path):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{cluster.report(job_id, log)}")
        time.sleep(0.5)


def _steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in STEP.finditer(text)]


def test_sbatch_two_tasks_train_checkpoint_and_log(cluster, corpus, tmp_path):
    out_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 4
    argv, env = cluster.sbatch_argv(out_dir, log, [*SMALL, f"training.steps={steps}", "checkpoint.interval=2"], "--wait", "--parsable")
    try:
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbatch --wait did not return in 240 s{cluster.report(None, log)}")
    job_id = result.stdout.strip().split(";")[0]
    text = log.read_text(errors="replace") if log.exists() else ""
    why = cluster.report(job_id, log)
    assert result.returncode == 0, f"job {job_id} exited with {result.returncode}: {result.stderr}{why}"

    assert f"== job {job_id} (restart 0): 2 tasks on 1 node(s)" in text, why
    # Both tasks joined one process group (gloo: init_distributed picks it without CUDA), DP 2.
    assert re.search(r"\b2 process\S* \(slurm\): TP 1 PP 1 CP 1 DP 2\b.* fp32 on cpu", text), why
    assert _steps(text) == list(range(1, steps + 1)), f"expected step lines 1..{steps}{why}"
    assert "== finished: tiny (kla" in text, why

    ckpt = out_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{steps:07d}", why
    for step in (2, steps):
        assert f"saved checkpoint {ckpt / f'step_{step:07d}'}" in text, why
    final = ckpt / f"step_{steps:07d}"
    assert (final / "trainer.json").is_file() and (final / "state").is_dir(), why
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"], why
    assert list((out_dir / "tb").glob("events.out.tfevents.*")), f"no TensorBoard events in {out_dir / 'tb'}{why}"
    corpus["manifest"] = str(out_dir / "data" / "manifest.json")


def test_usr1_checkpoints_requeues_and_resumes(cluster, corpus, tmp_path):
    out_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 40
    # checkpoint.interval beyond the run: the only checkpoints are the signal's and the last step's.
    # The corpus the first test prepared, if it ran (saves ~15 s); else the script prepares its own.
    reuse = {"DATA_MANIFEST": corpus["manifest"]} if "manifest" in corpus else {}
    argv, env = cluster.sbatch_argv(out_dir, log, [*SMALL, f"training.steps={steps}", "checkpoint.interval=1000"], "--parsable", **reuse)
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"sbatch failed: {result.stdout}{result.stderr}{cluster.report(None, log)}"
    job_id = result.stdout.strip().split(";")[0]
    read = lambda: log.read_text(errors="replace") if log.exists() else ""  # noqa: E731

    # A few steps in, Slurm's warning: USR1 to the batch shell only, as --signal=B:USR1@300 sends it.
    _wait(lambda: len(_steps(read())) >= 3, 180, "3 training steps in the job log", cluster, job_id, log)
    assert cluster.job(job_id).get("JobState") == "RUNNING", cluster.report(job_id, log)
    cluster.command("scancel", "--signal=USR1", "--batch", job_id)

    stopped = _wait(lambda: re.search(r"^stopping at step (\d+) on a signal", read(), re.M), 90,
                    "the trainer to stop on the signal", cluster, job_id, log)
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < steps, cluster.report(job_id, log)
    ckpt = out_dir / "checkpoints"
    assert f"saved checkpoint {ckpt / f'step_{stop_step:07d}'}" in read(), cluster.report(job_id, log)
    assert (ckpt / "latest").read_text().strip() == f"step_{stop_step:07d}", cluster.report(job_id, log)

    # The script requeued the job: it waits in the queue (BeginTime, ~2 minutes) with one restart.
    state = _wait(
        lambda: (j := cluster.job(job_id)).get("JobState") == "PENDING" and j.get("Restarts") == "1" and j,
        60, "the job to be requeued (PENDING, Restarts=1)", cluster, job_id, log,
    )
    assert state.get("Reason") in ("BeginTime", "None", "Priority", "Resources"), cluster.report(job_id, log)
    # Release it early, but only once the node has finished the first run: slurmd revokes the job's
    # credential when the requeue kills it (second resolution), and a relaunch within that second, or
    # while the node is still completing, is refused ("Job credential revoked") or killed by the late
    # cleanup of the first run. The ~2 minute BeginTime hold normally covers this.
    _wait(cluster.node_idle, 60, "the node to be idle after the requeue", cluster, job_id, log)
    time.sleep(2)
    cluster.command("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    final = _wait(
        lambda: (j := cluster.job(job_id)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and j,
        240, "the requeued job to finish", cluster, job_id, log,
    )
    text = read()
    why = cluster.report(job_id, log)
    assert final["JobState"] == "COMPLETED" and final.get("ExitCode") == "0:0", why
    first, _, second = text.partition(f"== job {job_id} (restart 1): 2 tasks on 1 node(s)")
    assert second, f"no '(restart 1)' line: the requeued run did not see SLURM_RESTART_COUNT=1{why}"
    assert f"== job {job_id} (restart 0): 2 tasks" in first, why
    assert "== USR1 before the time limit: checkpointing, then requeueing job" in first, why
    assert f"resumed from {ckpt / f'step_{stop_step:07d}'} at step {stop_step}" in second, why
    assert _steps(first) == list(range(1, stop_step + 1)), why
    assert _steps(second) == list(range(stop_step + 1, steps + 1)), why
    assert f"saved checkpoint {ckpt / f'step_{steps:07d}'}" in second and "== finished: tiny (kla" in second, why
    assert (ckpt / "latest").read_text().strip() == f"step_{steps:07d}", why
