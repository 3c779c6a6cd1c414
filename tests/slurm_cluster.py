"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd as root on loopback, every
file under one temp folder, four fake GPUs (character devices), no accounting.

`SlurmCluster.start()` raises `ClusterUnavailable` (the tests skip with its text) when the packages
are missing or the daemons do not come up; `stop()` cancels jobs and stops the daemons in the order
that leaves no slurmstepd behind (slurmd, slurmctld, munged).
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
N_GPUS = 4


class ClusterUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


class SlurmCluster:
    def __init__(self, cpus: int = 4):
        self.cpus = cpus
        self.base = Path(tempfile.mkdtemp(prefix="harness-slurm-"))
        os.chmod(self.base, 0o755)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.base / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket.2"
        self.procs: list[str] = []  # pid files of the daemons started, in start order
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- helpers --------------------------------------------------------------------------
    def _bin(self, name: str) -> str:
        return shutil.which(name) or str(Path("/usr/sbin", name))

    def cmd(self, *args: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
        r = subprocess.run([self._bin(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                           env=self.env)
        if check and r.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-300:]}")
        return r

    def log_tail(self, name: str, n: int = 8) -> str:
        p = self.base / "log" / name
        return " | ".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else "(no log)"

    # -- start / stop ---------------------------------------------------------------------
    def _write_config(self) -> None:
        for d in ("state", "spool", "log", "run", "munge"):
            (self.base / d).mkdir()
        for i in range(N_GPUS):  # gres needs device files: char devices (a copy of /dev/null)
            os.mknod(self.base / f"nvidia{i}", 0o666 | 0o020000, os.makedev(1, 3))
        ctl_port, d_port = _free_port(), _free_port()
        b = self.base
        self.conf.write_text("\n".join([
            "ClusterName=harnesstest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}", f"SlurmdPort={d_port}",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={b}/state", f"SlurmdSpoolDir={b}/spool",
            f"SlurmctldPidFile={b}/run/slurmctld.pid", f"SlurmdPidFile={b}/run/slurmd.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log", f"SlurmdLogFile={b}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "GresTypes=gpu",
            "ReturnToService=2", "SlurmdParameters=config_overrides", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2",
            "KillWait=10", "MinJobAge=300", "InactiveLimit=0", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "JobRequeue=1", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 Gres=gpu:{N_GPUS} "
            "State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            ""]))
        (b / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File={b}/nvidia[0-{N_GPUS - 1}]\n")

    def start(self) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("the one-node Slurm is started as root (SlurmUser=root); not root here")
        missing = missing_binaries()
        if missing:
            raise ClusterUnavailable(f"Slurm/munge binaries missing: {', '.join(missing)} "
                                     "(apt-get install slurmctld slurmd slurm-client munge)")
        try:
            pw = pwd.getpwnam("munge")
        except KeyError:
            raise ClusterUnavailable("no `munge` system user (the munge package makes it)") from None
        self._write_config()
        m = self.base / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for p in (m, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(m, 0o755)
        self.procs.append(str(m / "munged.pid"))
        r = subprocess.run(["runuser", "-u", "munge", "--", self._bin("munged"), f"--socket={self.munge_socket}",
                            f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                            f"--seed-file={m}/munged.seed", "--force"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ClusterUnavailable(f"munged did not start: {(r.stderr or r.stdout).strip()[-300:]}")
        for daemon, extra in (("slurmctld", ["-i"]), ("slurmd", ["-N", self.node])):
            self.procs.append(str(self.base / "run" / f"{daemon}.pid"))
            r = subprocess.run([self._bin(daemon), "-f", str(self.conf), *extra], capture_output=True, text=True,
                               timeout=60, env=self.env)
            if r.returncode != 0:
                raise ClusterUnavailable(f"{daemon} did not start (exit {r.returncode}): "
                                         f"{(r.stderr or r.stdout).strip()[-300:]}; log: {self.log_tail(daemon + '.log')}")
        deadline = time.monotonic() + 60
        while True:
            r = self.cmd("sinfo", "-h", "-N", "-o", "%t")
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"the node did not become idle in 60 s (sinfo: "
                                         f"{(r.stdout or r.stderr).strip()}); slurmctld log: "
                                         f"{self.log_tail('slurmctld.log')}; slurmd log: {self.log_tail('slurmd.log')}")
            time.sleep(0.5)

    def _kill_pidfile(self, pidfile: str, timeout: float = 20) -> None:
        try:
            pid = int(Path(pidfile).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass

    def cancel_all(self) -> None:
        if self.conf.exists():
            try:
                self.cmd("scancel", "--full", "-u", "root", timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def wait_idle(self, timeout: float = 60) -> bool:
        """True once no job of the cluster is pending or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.cmd("squeue", "-h", "-o", "%i")
            if r.returncode == 0 and not r.stdout.strip():
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        self.cancel_all()
        self.wait_idle(30)
        for pidfile in reversed(self.procs):  # slurmd, slurmctld, munged
            self._kill_pidfile(pidfile)
        shutil.rmtree(self.base, ignore_errors=True)
