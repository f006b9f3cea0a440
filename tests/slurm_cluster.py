"""Start and stop a real SLURM cluster (slurmctld + 2 slurmd + munged) on this one machine, for tests.

Recipe from ../shared/SLURM.md (Debian slurm-wlm 22.05, munge, root, no systemd):
- munged runs as the munge user on a private socket in the cluster directory;
- slurm.conf lives in the cluster directory and is found through SLURM_CONF (nothing in /etc changes);
- the daemons run inside `unshare --mount` with a copy of /etc/hosts that adds the node names
  bind-mounted over /etc/hosts, so jobs can resolve n1, n2 (the real file is untouched);
- stop() cancels the jobs, then kills every daemon by the PID in its pid file.

Packages (CI installs them up front; `ensure_installed` does it here if missing and we are root):
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "unshare")
APT_COMMAND = ("apt-get update && DEBIAN_FRONTEND=noninteractive "
               "apt-get install -y --no-install-recommends slurm-wlm munge")
MUNGE_KEY = Path("/etc/munge/munge.key")


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the test cluster (not root, packages missing and not installable)."""


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt if any binary is missing; raise ClusterUnavailable if we cannot."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("the SLURM test cluster needs root (it starts munged, slurmctld, slurmd)")
    if all(shutil.which(b) for b in BINARIES) and MUNGE_KEY.exists():
        return
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(f"slurm-wlm/munge are missing and apt-get is not available; run: {APT_COMMAND}")
    done = subprocess.run(["bash", "-c", APT_COMMAND], capture_output=True, text=True)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if done.returncode != 0 or missing or not MUNGE_KEY.exists():
        raise ClusterUnavailable(f"could not install slurm-wlm/munge (missing: {missing or MUNGE_KEY}): "
                                 f"{done.stderr.strip()[-500:]}")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (PID 1 here does not reap, so kill -0 would lie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class SlurmCluster:
    """One controller and `nodes` compute nodes (n1, n2, ...) with `cpus_per_node` CPUs each, partition `debug`."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2):
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.dir = Path(tempfile.mkdtemp(prefix="rdinet-slurm-"))
        self.dir.chmod(0o755)  # munged (user munge) must reach its socket below this directory
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.pid_files: list[Path] = []

    # --- environment for every client command (sbatch, squeue, ...) and for the jobs themselves
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        done = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    # --- start
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self._start_munge()
        self._write_config()
        self._start_slurm_daemons()
        self._wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir()
        shutil.chown(munge_dir, "munge", "munge")
        munge_dir.chmod(0o755)
        pid_file = munge_dir / "munged.pid"
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}",
                        f"--pid-file={pid_file}", f"--log-file={munge_dir / 'munged.log'}",
                        f"--seed-file={munge_dir / 'munged.seed'}"], check=True, capture_output=True)
        self.pid_files.append(pid_file)
        credential = subprocess.run(["munge", "-n", f"--socket={self.munge_socket}"], capture_output=True, check=True)
        subprocess.run(["unmunge", f"--socket={self.munge_socket}"], input=credential.stdout,
                       capture_output=True, check=True)

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(self.node_names))
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir()
        lines = [
            "ClusterName=ci",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={self.dir / 'state'}",
            f"SlurmdSpoolDir={self.dir / 'spool'}/%n",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SlurmdParameters=config_overrides", "DependencyParameters=kill_invalid_depend",
            "ReturnToService=2", "MpiDefault=none", "MailProg=/bin/true",
            "KillWait=30", "MinJobAge=600", "MessageTimeout=30",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=1048576 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        hosts = Path("/etc/hosts").read_text()
        (self.dir / "hosts").write_text(hosts.rstrip("\n") + "\n127.0.0.1 " + " ".join(self.node_names) + "\n")

    def _start_slurm_daemons(self) -> None:
        daemons = ["slurmctld"] + [f"slurmd -N {name}" for name in self.node_names]
        script = f"set -e; mount --bind {self.dir / 'hosts'} /etc/hosts; " + "; ".join(daemons)
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                              env=self.env, capture_output=True, text=True)
        self.pid_files += [self.dir / "slurmctld.pid"] + [self.dir / f"slurmd-{n}.pid" for n in self.node_names]
        if done.returncode != 0:
            raise RuntimeError(f"starting the SLURM daemons failed: {done.stderr.strip()}\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            done = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = done.stdout.strip()
            lines = states.splitlines()
            if len(lines) == len(self.node_names) and all(line.split()[1] == "idle" for line in lines):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states!r}\n{self.logs()}")

    # --- queries
    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, StartTime, EndTime, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_done(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
        """Poll until no job of `job_ids` is pending/running/requeued; return their final fields."""
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}
        deadline = time.monotonic() + timeout
        while True:
            jobs = {job_id: self.job(job_id) for job_id in job_ids}
            if all(info.get("JobState") not in active for info in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                states = {job_id: (info.get("JobState"), info.get("Reason")) for job_id, info in jobs.items()}
                raise TimeoutError(f"jobs still active after {timeout:.0f} s: {states}")
            time.sleep(0.5)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for log in sorted((self.dir / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- stop
    def stop(self) -> None:
        """Cancel every job, then kill the daemons by PID (slurmd, slurmctld, munged) and remove the directory."""
        if self.conf.exists():
            self.run("scancel", "--full", "--user=root", check=False, timeout=30)
            deadline = time.monotonic() + 45  # KillWait (30 s) after SIGTERM, jobs are killed
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", "-o", "%i", check=False, timeout=30)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for pid_file in reversed(self.pid_files):  # slurmds first, munged last
            self._kill(pid_file)
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _kill(pid_file: Path, timeout: float = 10.0) -> None:
        try:
            pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return
        for sig in (15, 9):
            if not _process_alive(pid):
                return
            os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while _process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
