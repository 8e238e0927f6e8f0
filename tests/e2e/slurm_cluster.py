"""A real two-node SLURM cluster on this machine, for the launch-script tests.

munged, slurmctld and one slurmd per emulated node (Debian's slurm-wlm has MULTIPLE_SLURMD),
with the facts of shared/SLURM_LOCAL.md: no cgroups or accounting, the node names added to
/etc/hosts (one marked line, removed again) so torch's rendezvous at `node1` resolves, and
zero scheduling delay. Needs root and the slurm-wlm and munge packages (`make test` installs
them where apt-get can); only the daemons started here are stopped. A test module gets the
session's one cluster as its `slurm` fixture with `slurm = cluster_fixture()`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOSTS_MARK = "# clipkit-test-slurm"
NODES = ("node1", "node2")


def missing_requirements() -> str | None:
    """Why a cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the SLURM daemons need root"
    absent = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not Path(_sbin(b)).exists()]
    return f"slurm-wlm/munge not installed (missing {', '.join(absent)}); `make test` installs them with apt-get" \
        if absent else None


def _free_port_pair() -> int:
    """A port p with p and p + 1 both free (the two slurmd ports are given as a range)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """`start()` writes slurm.conf under `root` and starts the daemons; `env` points clients at it."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.pids: list[int] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._hosts_added = False

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "run", "log", *(f"spool/{node}" for node in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, node_port = _free_port_pair(), _free_port_pair()
        cpus = os.cpu_count() or 2
        self.conf.write_text(f"""ClusterName=clipkit-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName=node[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_port}-{node_port + 1}] CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _add_hosts(self) -> None:
        hosts = Path("/etc/hosts").read_text()
        if not all(any(n in line.split() for line in hosts.splitlines()) for n in NODES):
            with open("/etc/hosts", "a") as f:
                f.write(f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}\n")
            self._hosts_added = True

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return  # one is running already: use it, leave it
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True)
        pid = subprocess.run(["pgrep", "-n", "-x", "munged"], capture_output=True, text=True).stdout.strip()
        if pid:
            self.pids.append(int(pid))

    def _pid_file(self, name: str) -> int:
        path = self.root / "run" / name
        deadline = time.monotonic() + 30
        while not (path.exists() and path.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not appear; see {self.root}/log")
            time.sleep(0.1)
        return int(path.read_text().strip())

    def start(self) -> SlurmCluster:
        self._write_conf()
        self._add_hosts()
        self._start_munge()
        subprocess.run([_sbin("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(self._pid_file("slurmctld.pid"))
        for node in NODES:
            subprocess.run([_sbin("slurmd"), "-f", str(self.conf), "-N", node], check=True, env=self.env)
            self.pids.append(self._pid_file(f"slurmd-{node}.pid"))
        deadline = time.monotonic() + 60
        while True:
            idle = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True,
                                  env=self.env).stdout.split()
            if set(NODES) <= set(idle):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle within 60 s ({idle}); see {self.root}/log")
            time.sleep(0.2)

    def job_state(self, job: str) -> dict[str, str]:
        """`scontrol show job` as {field: value}."""
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=self.env).stdout
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def wait_for(self, job: str, done, timeout: float, what: str) -> dict[str, str]:
        """Polls the job (sbatch --wait polls every few seconds; this every 0.2 s) until
        `done(state)`; a job that failed or vanished raises with its state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job)
            if done(state):
                return state
            if state.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", None):
                raise AssertionError(f"job {job} ended {state.get('JobState')} while waiting for {what}: {state}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job}: no {what} within {timeout:.0f} s: {state}")
            time.sleep(0.2)

    def cancel_jobs(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env)

    def stop(self) -> None:
        self.cancel_jobs()
        for pid in reversed(self.pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        if self._hosts_added:
            lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
            Path("/etc/hosts").write_text("".join(line for line in lines if HOSTS_MARK not in line))


_shared: SlurmCluster | None = None


def shared_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SlurmCluster:
    """The session's one cluster, started for the first test that asks (under a second here) and
    stopped when the session ends; the test is skipped, with the reason, where none can run."""
    global _shared
    why = missing_requirements()
    if why:
        pytest.skip(f"no SLURM cluster: {why}")
    if _shared is None:
        _shared = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
        request.session.addfinalizer(_shared.stop)
    return _shared


def cluster_fixture():
    """A module's `slurm` fixture: the session's cluster, with the jobs the module left (a failed
    test's) cancelled at its end, so they do not hold the nodes for the next module."""

    @pytest.fixture(scope="module")
    def slurm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
        cluster = shared_cluster(request, tmp_path_factory)
        yield cluster
        cluster.cancel_jobs()

    return slurm
