"""A real two-node Slurm on this machine for tests/slurm (Debian's slurm-wlm + munge; `bash
.ci/install_slurm` installs them), started once for the session and stopped at its end.

munged, slurmctld and two slurmd daemons (nodes klanode1 and klanode2: their own NodeHostname and
port, NodeAddr 127.0.0.1, started with `slurmd -N`) run from a temp dir; every file they write is
there. The node names do not resolve, as on clusters whose Slurm names are not DNS names: jobs find
the first node's address through its NodeAddr. klanode2's slurmd runs in its own mount namespace with
a private tmpfs at `node-local/`, so that directory is node-local storage: a job on both nodes that
writes there is what a job with an output dir on a node's local disk does.
"""

import json
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
BINARIES = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo", "slurmctld", "slurmd", "munged")
NODES = ("klanode1", "klanode2")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")

# A few CPU steps of configs/tiny.toml (what the script trains without CONFIG).
SMALL = [
    "data.seq_length=64", "training.micro_batch_size=2", "training.global_batch_size=4",
    "training.warmup_steps=1", "eval.interval=0", "logging.interval=1",
]
# The template asks for 8 GPUs x 8 tasks x 12 CPUs a node; these nodes have 2 CPUs and no GPU.
# --time leaves the template's USR1@300 s warning far away; tests send USR1 themselves.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]
STEP = re.compile(r"^step\s+(\d+)/(\d+) \| loss ([0-9.]+)", re.M)


def which(name: str):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


MISSING = [name for name in BINARIES if which(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def steps(text: str) -> dict:
    """{step: loss} of the trainer's step lines."""
    return {int(m.group(1)): float(m.group(3)) for m in STEP.finditer(text)}


def _terminate(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def job_env() -> dict:
    """What a user's shell passes to sbatch: no launcher variables, and not the CPU switches that
    tests/conftest.py sets for in-process tests (jobs must run on a CPU node without them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CONFIG",
                "OUTPUT_DIR", "DATA_MANIFEST", "NPROC", "DS_ACCELERATOR", "TRITON_INTERPRET", "REQUEUE", "GPU_MEMORY"):
        env.pop(key, None)
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return env


class Cluster:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="kla-slurm-"))
        self.dir.chmod(0o755)  # munged runs as user munge and needs to reach its own subdir
        self.conf = self.dir / "slurm.conf"
        self.node_local = self.dir / "node-local"
        self.node_local_is_private = False
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(job_env(), SLURM_CONF=str(self.conf))

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
            [which("munged"), "--foreground", f"--socket={socket_path}", f"--key-file={MUNGE_KEY}",
             f"--log-file={munge_dir / 'munged.log'}", f"--pid-file={munge_dir / 'munged.pid'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
            user="munge", group="munge", extra_groups=[],
        )
        self._wait_for(lambda: socket_path.exists(), 15, "munged to open its socket")

        for sub in ("state", "spool", "node-local"):
            (self.dir / sub).mkdir()
        cpus = os.cpu_count() or 2
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} State=UNKNOWN"
            for name in NODES
        )
        self.conf.write_text(
            f"""\
ClusterName=klatest
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmUser=root
SlurmctldPort={free_port()}
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
SlurmdSpoolDir={self.dir / 'spool'}/%n
SlurmctldPidFile={self.dir / 'slurmctld.pid'}
SlurmdPidFile={self.dir / 'slurmd-%n.pid'}
SlurmctldLogFile={self.dir / 'slurmctld.log'}
SlurmdLogFile={self.dir / 'slurmd-%n.log'}
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
        first, second = NODES
        self._spawn(f"slurmd-{first}", [which("slurmd"), "-D", "-f", str(self.conf), "-N", first])
        slurmd = [which("slurmd"), "-D", "-f", str(self.conf), "-N", second]
        unshare = which("unshare")
        if unshare and self._private_mounts_work(unshare):
            # exec: the Popen's pid stays slurmd's, so stop() ends it by its own id
            script = 'mount -t tmpfs kla-node-local "$0" && exec "$@"'
            self._spawn(f"slurmd-{second}", [unshare, "--mount", "--propagation", "private", "sh", "-c", script,
                                             str(self.node_local), *slurmd])
            self.node_local_is_private = True
        else:
            self._spawn(f"slurmd-{second}", slurmd)
        self._wait_for(self.nodes_idle, 60, f"nodes {', '.join(NODES)} to be idle")

    def _private_mounts_work(self, unshare: str) -> bool:
        probe = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c",
                                f'mount -t tmpfs kla-probe "{self.node_local}" && touch "{self.node_local}/x"'],
                               capture_output=True, timeout=20)
        return probe.returncode == 0 and not (self.node_local / "x").exists()

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

    def nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True, timeout=20)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(name) == "idle" for name in NODES)

    def stop(self) -> None:
        """Cancel every job, stop the daemons by their own ids, then end anything still running under
        this cluster's slurm.conf (slurmstepd and job processes inherit SLURM_CONF)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.job_ids()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env, capture_output=True, timeout=20)
                deadline = time.monotonic() + 30
                while self._running_jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in (*(f"slurmd-{n}" for n in NODES), "slurmctld", "munged"):
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
        names = ["munged.out", "munge/munged.log", "slurmctld.out", "slurmctld.log"]
        names += [f"slurmd-{n}{suffix}" for n in NODES for suffix in (".out", ".log")]
        return "\n".join(f"--- {name} (tail)\n{tail(self.dir / name, 30)}" for name in names if (self.dir / name).exists())

    # -- jobs -----------------------------------------------------------------------------------
    def command(self, *argv: str, timeout: float = 30, check: bool = True, env: dict = None) -> subprocess.CompletedProcess:
        out = subprocess.run(list(argv), cwd=ROOT, env=dict(self.env, **(env or {})), capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` exited with {out.returncode}:\n{out.stdout}{out.stderr}\n{self.daemon_logs()}")
        return out

    def submit(self, log: Path, *options: str, script: Path = SCRIPT, args=(), env: dict = None) -> str:
        """sbatch the script from the repository root (it finds the checkout through SLURM_SUBMIT_DIR)."""
        out = self.command("sbatch", "--parsable", *CPU_JOB, f"--output={log}", *options, str(script), *args, env=env)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.command("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, condition, timeout: float, what: str, job_id=None, log: Path = None):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{self.report(job_id, log)}")
            time.sleep(0.5)

    def finished(self, job_id: str, timeout: float, log: Path = None) -> dict:
        return self.wait(lambda: (j := self.job(job_id)).get("JobState") in FINISHED and j, timeout,
                         f"job {job_id} to finish", job_id, log)

    def report(self, job_id, log: Path = None) -> str:
        info = self.command("scontrol", "show", "job", job_id, check=False).stdout if job_id else ""
        text = f"\n--- job log {log}\n{tail(log, 150)}" if log else ""
        return f"{text}\n--- scontrol show job {job_id}\n{info}\n{self.daemon_logs()}"


@pytest.fixture(scope="session")
def cluster():
    if MISSING:
        pytest.skip(f"Slurm is not installed ({', '.join(MISSING)} not found): run `bash .ci/install_slurm`")
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """The embedded default corpus, prepared once for the jobs that do not test its preparation."""
    out = tmp_path_factory.mktemp("default-corpus")
    result = subprocess.run([sys.executable, "-m", "data_prep", "default-corpus", "--output", str(out)],
                            cwd=ROOT, env=dict(job_env(), PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = out / "manifest.json"
    return {"manifest": str(manifest), **json.loads(manifest.read_text())}
