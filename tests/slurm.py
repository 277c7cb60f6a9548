"""A real Slurm cluster on one machine for tests: munged, slurmctld and two slurmd, each daemon on its own
test host (tests/netns.py: network, PID and mount namespaces on a bridge, addresses 10.213.0.x).

- ``controller`` (10.213.0.3) runs slurmctld and is the login node: `orchestra launch --slurm`, squeue and
  scancel run there, because only the test hosts' bridge reaches the daemons (the root namespace has no
  address on it);
- ``nodes`` (10.213.0.1, 10.213.0.2) each run ``slurmd -N <name>``: Slurm node ``nodea`` / ``nodeb`` with
  ``NodeAddr`` its host's address, so a job step runs inside that host (its own /tmp/ray, its own PIDs);
- one munged in the root namespace with a test-generated key; every daemon and client reaches it through
  its socket file (``AuthInfo=socket=...``), since unix sockets do not depend on network namespaces.

Everything is generated into a temporary folder: ``slurm.conf`` (SlurmUser=root, SlurmctldHost on the
controller's address, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, SelectType=select/cons_tres,
AccountingStorageType=accounting_storage/none, JobCompType=jobcomp/none), the munge key, state and spool
folders and logs. Slurm 22.05's slurmd initialises its cgroup plugin even when no plugin uses cgroups, and
`ip netns exec` gives each host a fresh /sys without the cgroup mounts; each node host therefore mounts,
inside its own mount namespace, a tmpfs at /sys/fs/cgroup and an empty named cgroup v1 hierarchy
(``name=orchslurm``, no controllers) at /sys/fs/cgroup/systemd, which slurmd accepts and never writes to. Closing kills the hosts (and with
them every daemon, job step and Ray process), then munged by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

from netns import Lab, have_namespaces, ray_env, wait_for

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
NODES = {"nodea": 1, "nodeb": 2}  # Slurm node name -> test host index (address 10.213.0.N)
CONTROLLER_INDEX = 3


def have_slurm() -> str | None:
    """None if this machine can run the Slurm tests, else the reason."""
    reason = have_namespaces()
    if reason:
        return reason
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        return f"needs Slurm and munge ({', '.join(missing)} not found; Debian: apt-get install slurm-wlm munge)"
    return None


def _bin(tool: str) -> str:
    return shutil.which(tool) or str(Path("/usr/sbin", tool))


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, in test hosts of ``lab``; ``close()`` ends them all."""

    def __init__(self, root: Path, lab: Lab, cpus: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lab = lab
        self.cpus = cpus or os.cpu_count() or 1
        # Unix socket paths are limited to 108 bytes, and slurmstepd makes its sockets in the spool dir:
        # sockets and spool dirs live in a short folder of /tmp, not under the test's (long) tmp_path.
        self.sockets = Path(tempfile.mkdtemp(prefix="orchslurm", dir="/tmp"))
        self.sockets.chmod(0o755)  # munged wants every folder above its socket searchable
        self.munge = self.sockets / "munge"
        self.munge.mkdir(mode=0o700)
        self.conf = self.root / "slurm.conf"
        self.munged: subprocess.Popen | None = None
        self.nodes = {name: lab.add_host(name[-1], index) for name, index in NODES.items()}
        self.controller = lab.add_host("c", CONTROLLER_INDEX)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of Slurm clients and jobs on the test hosts: Ray's test env plus SLURM_CONF."""
        return ray_env({"SLURM_CONF": str(self.conf), **(extra or {})})

    def write_config(self) -> None:
        r, ctl = self.root, self.controller
        nodes = "\n".join(f"NodeName={n} NodeAddr={h.ip} CPUs={self.cpus} State=UNKNOWN" for n, h in self.nodes.items())
        # slurmctld checks that SlurmctldHost names the machine it runs on: the real host name, the
        # controller host's address.
        self.conf.write_text(textwrap.dedent(f"""\
            ClusterName=orchtest
            SlurmctldHost={socket.gethostname().split('.')[0]}({ctl.ip})
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge / 'munge.socket'}
            StateSaveLocation={r / 'ctld-state'}
            SlurmdSpoolDir={self.sockets}/slurmd-%n
            SlurmctldPidFile={r / 'slurmctld.pid'}
            SlurmdPidFile={r}/slurmd-%n.pid
            SlurmctldLogFile={r / 'slurmctld.log'}
            SlurmdLogFile={r}/slurmd-%n.log
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_CPU
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/none
            JobAcctGatherType=jobacct_gather/none
            MpiDefault=none
            ReturnToService=2
            MinJobAge=3600
            """) + nodes + f"\nPartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP\n")
        (r / "ctld-state").mkdir(exist_ok=True)
        for n in self.nodes:
            (self.sockets / f"slurmd-{n}").mkdir(exist_ok=True)

    def start(self, timeout: float = 600) -> None:
        self.write_config()
        key = self.munge / "munge.key"
        key.write_bytes(os.urandom(128))  # test-only key
        key.chmod(0o400)
        m = self.munge
        self.munged = subprocess.Popen(
            [_bin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={m / 'munge.socket'}",
             f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: (m / "munge.socket").exists(), 120, "munged's socket")
        env = self.env()
        self.controller.popen([_bin("slurmctld"), "-D", "-f", str(self.conf)], env=env, log=self.root / "slurmctld.out")
        for name, host in self.nodes.items():
            host.run("mount -t tmpfs cgroup_root /sys/fs/cgroup && mkdir /sys/fs/cgroup/systemd && "
                     "mount -t cgroup -o none,name=orchslurm cgroup /sys/fs/cgroup/systemd",
                     env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}, check=True)
            host.popen([_bin("slurmd"), "-D", "-N", name, "-f", str(self.conf)], env=env,
                       log=self.root / f"slurmd-{name}.out")
        wait_for(lambda: self.idle_nodes() == len(self.nodes), timeout,
                 f"{len(self.nodes)} idle Slurm nodes (logs in {self.root})")

    def sh(self, cmd: str, timeout: float = 600, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``cmd`` in bash on the login node (the controller host)."""
        return self.controller.run(cmd, env=self.env(extra_env), timeout=timeout)

    def idle_nodes(self) -> int:
        res = self.sh("sinfo -h -N -o '%N %T'", timeout=120)
        return sum(line.split()[-1] == "idle" for line in res.stdout.splitlines() if line.strip())

    def check_daemons(self) -> None:
        """Raise with the log line if a Slurm daemon or job step logged a fatal error (polls call this, so
        a broken cluster fails the test at once instead of at its deadline)."""
        for log in sorted(self.root.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "fatal:" in line:
                    raise RuntimeError(f"{log.name}: {line.strip()}")

    def close(self) -> None:
        self.lab.close()  # every daemon, job step and Ray process of the hosts
        if self.munged is not None and self.munged.poll() is None:
            os.killpg(self.munged.pid, signal.SIGTERM)
            try:
                self.munged.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.munged.pid, signal.SIGKILL)
                self.munged.wait(60)
        shutil.rmtree(self.sockets, ignore_errors=True)


def processes(host, markers: tuple[str, ...]) -> list[str]:
    """The host's processes whose command line contains one of ``markers``."""
    return [p for p in host.procs() if any(m in p for m in markers)]


def wait_gone(host, markers: tuple[str, ...], timeout: float = 300) -> None:
    wait_for(lambda: not processes(host, markers), timeout, f"no {markers} process left on {host.ip}")
