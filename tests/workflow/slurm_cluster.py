"""A throw-away one-node SLURM cluster on this machine, for the tests that submit real jobs with ``sbatch``.

:func:`slurm_cluster` starts ``munged``, ``slurmctld`` and ``slurmd`` (node ``localhost``) from a configuration
written into a temporary folder, waits until the node accepts jobs, and always stops the daemons it started (and
cancels their jobs), whether the test passed, failed or was interrupted. Nothing global is configured: the
daemons and the client commands read ``slurm.conf`` through ``SLURM_CONF`` (:attr:`SlurmCluster.env`), munge uses
a socket and a key of its own, and the ports are free ones picked at start.

One exception, forced by the executor plugin: inside a job, ``snakemake-executor-plugin-slurm-jobstep`` runs the
rule through ``srun`` with every ``SLURM_*`` variable removed, ``SLURM_CONF`` included, so ``srun`` looks for the
configuration where Slurm 22.05 looks without it: ``/etc/slurm/slurm.conf``, then ``/run/slurm/conf/slurm.conf``
(the link a *configless* slurmd publishes on real clusters). The cluster makes that link to its own folder for as
long as it runs and removes it after. A machine that already has ``/etc/slurm/slurm.conf`` (a real cluster node)
or a live ``/run/slurm/conf`` (another slurmd) is refused, since ``srun`` would talk to that cluster.

What it needs (else :class:`ClusterUnavailable`, which the tests turn into a skip): root (slurmd starts jobs as
their user), the Debian packages ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them), and daemons that start.
Tested with Slurm 22.05 (Debian 12): ``proctrack/linuxproc`` and ``task/none`` need no cgroup set-up;
``cgroup.conf`` still names ``cgroup/v1`` because 22.05 has no ``cgroup/disabled``. There is no accounting
database (no slurmdbd): job completions are written by ``jobcomp/filetxt`` (:meth:`SlurmCluster.completed_jobs`),
and the executor plugin is told to poll ``squeue`` (``MinJobAge`` keeps finished jobs visible to it).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: The daemons and client commands a cluster needs (Debian packages slurm-wlm and munge).
REQUIRED_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
#: Where ``srun`` looks for the configuration when ``SLURM_CONF`` is unset, in this order (Slurm 22.05).
GLOBAL_CONF = Path("/etc/slurm/slurm.conf")
CONFIGLESS_CACHE = Path("/run/slurm/conf")
#: Seconds finished jobs stay visible to ``squeue`` (the plugin's status poll); also the plugin's reliability check.
MIN_JOB_AGE_S = 600


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run on this machine (not installed, not root, a daemon did not start); the message says why."""


@dataclass
class SlurmCluster:
    """A running one-node cluster: its configuration, logs and the environment its client commands need."""

    root: Path
    conf: Path
    env: dict[str, str]
    ctld_log: Path
    slurmd_log: Path
    jobcomp: Path
    cpus: int
    real_memory_mb: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a client command (``sinfo``, ``squeue``, ...) against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def submitted_job_ids(self) -> list[int]:
        """Every job id slurmctld accepted from ``sbatch`` since it started, in order (from its log)."""
        text = self.ctld_log.read_text(errors="replace") if self.ctld_log.is_file() else ""
        return [int(j) for j in re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", text)]

    def completed_jobs(self) -> dict[int, dict[str, str]]:
        """job id -> the ``jobcomp/filetxt`` record of every job that has ended (``JobState``, ``JobName``, ...)."""
        jobs = {}
        if self.jobcomp.is_file():
            for line in self.jobcomp.read_text(errors="replace").splitlines():
                fields = dict(re.findall(r"(\w+)=(\S*)", line))
                if "JobId" in fields:
                    jobs[int(fields["JobId"])] = fields
        return jobs

    def logs_tail(self, chars: int = 3000) -> str:
        """The end of every daemon log, for a failure or skip message."""
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ set-up


def find_programs() -> dict[str, str]:
    """Absolute paths of :data:`REQUIRED_PROGRAMS` (daemons live in ``/usr/sbin``, often not on a user's PATH)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    found = {name: shutil.which(name, path=search) for name in REQUIRED_PROGRAMS}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        raise ClusterUnavailable(
            f"SLURM is not installed ({', '.join(missing)} not found); as root: "
            "apt-get install -y slurm-wlm munge (what .ci/run does)")
    return {name: str(path) for name, path in found.items()}


def check_machine() -> None:
    """Refuse what this throw-away cluster cannot do safely: a non-root user or a machine with a real cluster."""
    if os.name != "posix" or os.geteuid() != 0:
        raise ClusterUnavailable("a local SLURM cluster needs root (slurmd starts jobs as their user); run as root")
    if GLOBAL_CONF.exists():
        raise ClusterUnavailable(
            f"{GLOBAL_CONF} exists: this machine belongs to a cluster, and srun inside a job (the jobstep plugin "
            "drops SLURM_CONF) would read it instead of the test cluster's configuration")
    if CONFIGLESS_CACHE.exists() and not _stale_link():
        raise ClusterUnavailable(f"{CONFIGLESS_CACHE} exists: another slurmd publishes its configuration here")


def node_hardware(slurmd: str) -> tuple[str, int, int]:
    """The node line ``slurmd -C`` reads from this machine (sockets, cores, threads, memory), its CPUs and memory.

    A node declared with more CPUs or memory than slurmd finds is drained, so the test cluster declares exactly
    what slurmd sees here."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((entry for entry in out.splitlines() if entry.startswith("NodeName=")), "")
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    try:
        cpus, memory = int(fields["CPUs"]), int(fields["RealMemory"])
    except (KeyError, ValueError) as err:
        raise ClusterUnavailable(f"cannot read this machine's CPUs and memory from `slurmd -C` ({out!r})") from err
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return " ".join(f"{k}={fields[k]}" for k in keep if k in fields), cpus, memory


def free_port() -> int:
    """A TCP port nobody listens on now (the daemons bind it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(root: Path, node: str) -> Path:
    """Write ``slurm.conf`` and ``cgroup.conf`` for a one-node cluster whose state, logs and sockets are in
    ``root``; return the path of ``slurm.conf``."""
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=siadtest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "SlurmctldDebug=info",  # info logs every accepted submission (_slurm_rpc_submit_batch_job)
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",  # no cgroup hierarchy needed (containers, CI)
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",  # --mem and --cpus-per-task are enforced at scheduling, as on a cluster
        "SchedulerType=sched/backfill",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct has nothing; the plugin polls squeue
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.txt'}",
        f"MinJobAge={MIN_JOB_AGE_S}",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdTimeout=120",
        "InactiveLimit=0",
        "KillWait=5",
        f"NodeName=localhost NodeAddr=127.0.0.1 {node} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
    return conf


def _start(name: str, cmd: list[str], env: dict[str, str], log: Path, stack: ExitStack,
           processes: dict[str, subprocess.Popen]) -> subprocess.Popen:
    """Start a daemon in the foreground (so this process owns it) and register its stop on ``stack``."""
    handle = log.open("ab")
    stack.callback(handle.close)
    process = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    processes[name] = process
    stack.callback(_stop, process)
    return process


def _stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; only the process this module started (and its own session)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session (start_new_session): nothing else is in it
        except ProcessLookupError:
            pass
        process.wait(5)


def _wait_for(what: str, ready, timeout_s: float, processes: dict[str, subprocess.Popen], cluster_logs) -> None:
    """Poll ``ready()`` until true; a daemon that exits or a timeout raises :class:`ClusterUnavailable`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = [name for name, p in processes.items() if p.poll() is not None]
        if dead:
            raise ClusterUnavailable(f"{', '.join(dead)} exited while waiting for {what}\n{cluster_logs()}")
        if ready():
            return
        time.sleep(0.5)
    raise ClusterUnavailable(f"timed out after {timeout_s:.0f} s waiting for {what}\n{cluster_logs()}")


def _cancel_jobs(cluster: SlurmCluster) -> None:
    """Cancel whatever jobs are still queued or running (a failed test), and give slurmd a moment to end them."""
    try:
        cluster.run("scancel", "--user", "root", timeout=15, check=False)
        for _ in range(20):
            if not cluster.run("squeue", "-h", "-t", "PD,R,CG", timeout=15, check=False).stdout.strip():
                return
            time.sleep(0.5)
    except (OSError, subprocess.SubprocessError):
        pass


@contextmanager
def slurm_cluster(root: Path, *, start_timeout_s: float = 60.0) -> Iterator[SlurmCluster]:
    """Start a one-node cluster with its files in ``root``; yield it once the node is idle; stop it on exit.

    Raises :class:`ClusterUnavailable` (before yielding) when SLURM is missing or does not start; the daemons
    already started are stopped then too."""
    check_machine()
    programs = find_programs()
    node, cpus, memory = node_hardware(programs["slurmd"])
    root.mkdir(parents=True, exist_ok=True)
    conf = write_config(root, node)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in list(env):  # a surrounding job's variables would make sbatch/srun talk about that job
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
            env.pop(name)
    cluster = SlurmCluster(root=root, conf=conf, env=env, ctld_log=root / "slurmctld.log",
                           slurmd_log=root / "slurmd.log", jobcomp=root / "jobcomp.txt", cpus=cpus,
                           real_memory_mb=memory)
    processes = cluster.processes
    with ExitStack() as stack:
        socket_path = root / "munge" / "munge.socket"
        _start("munged", [programs["munged"], "--foreground", "--force", f"--socket={socket_path}",
                          f"--key-file={key}", f"--log-file={root / 'munged.log'}",
                          f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}"],
               env, root / "munged.out", stack, processes)
        _wait_for("munged's socket", socket_path.exists, start_timeout_s, processes, cluster.logs_tail)
        _start("slurmctld", [programs["slurmctld"], "-D", "-i", "-f", str(conf)], env, root / "slurmctld.out",
               stack, processes)
        def controller_up() -> bool:
            return cluster.run("scontrol", "ping", timeout=10, check=False).stdout.count("UP") > 0

        _wait_for("slurmctld", controller_up, start_timeout_s, processes, cluster.logs_tail)
        _link_configless_cache(root)
        stack.callback(_unlink_configless_cache, root)
        _start("slurmd", [programs["slurmd"], "-D", "-N", "localhost", "-f", str(conf)], env, root / "slurmd.out",
               stack, processes)
        stack.callback(_cancel_jobs, cluster)  # runs before slurmd stops (ExitStack unwinds in reverse)

        def node_idle() -> bool:
            state = cluster.run("sinfo", "-h", "-N", "-n", "localhost", "-o", "%T", timeout=10, check=False)
            return state.stdout.strip().rstrip("*") == "idle"

        _wait_for("node localhost to be idle", node_idle, start_timeout_s, processes, cluster.logs_tail)
        yield cluster


def _stale_link() -> bool:
    """Whether ``/run/slurm/conf`` is a link a killed test run left: its folder has no live slurmd."""
    if not CONFIGLESS_CACHE.is_symlink():
        return False
    try:
        pid = int((CONFIGLESS_CACHE / "slurmd.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return True  # no folder, no pid file or no such process
    return False


def _link_configless_cache(root: Path) -> None:
    """Point ``/run/slurm/conf`` at ``root`` (which holds ``slurm.conf``), for ``srun`` without ``SLURM_CONF``."""
    try:
        CONFIGLESS_CACHE.parent.mkdir(parents=True, exist_ok=True)
        if _stale_link():
            CONFIGLESS_CACHE.unlink()  # left by a killed run
        CONFIGLESS_CACHE.symlink_to(root, target_is_directory=True)
    except OSError as err:
        raise ClusterUnavailable(f"cannot link {CONFIGLESS_CACHE} to {root} ({err})") from err


def _unlink_configless_cache(root: Path) -> None:
    """Remove ``/run/slurm/conf`` when it is the link :func:`_link_configless_cache` made to ``root``."""
    try:
        if CONFIGLESS_CACHE.is_symlink() and Path(os.readlink(CONFIGLESS_CACHE)) == root:
            CONFIGLESS_CACHE.unlink()
    except OSError:
        pass
