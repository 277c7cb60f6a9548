"""Test hosts on one machine: Linux network + PID + mount namespaces joined by a bridge.

Each :class:`Host` is a network namespace with its own address 10.213.0.N (test-created; nothing
here talks to any other address), its own PID namespace (so `ray stop` inside sees only the host's
processes, and killing the namespace's init kills every process of the host) and its own mount
namespace with a private ``/root`` (home: ~/.bashrc, ~/.ray/auth_token) and ``/tmp/ray`` (Ray
sessions, address file, local-provider state), like a separate machine on a shared filesystem.

Topology: a hub namespace holds a bridge; every host has ``eth0`` (veth) whose peer sits in the hub
on the bridge. The root namespace gets no interface, route or address.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.213.0"
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)

# PID 1 of a host: reaps orphans (Ray daemonizes its processes), exits on SIGTERM; the kernel then
# SIGKILLs everything left in the PID namespace.
_INIT = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
    "while True:\n"
    "    try:\n"
    "        os.wait()\n"
    "    except ChildProcessError:\n"
    "        time.sleep(0.2)\n"
)


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray processes on test hosts: multi-node allowed, no usage stats, token auth."""
    env = {
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        # Linux default; set because conftest/Makefile set 0 for loopback-only local Ray.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "RAY_AUTH_MODE": "token",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        "RAY_DEDUP_LOGS": "0",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        # generous delivery deadlines on a loaded machine, as tests/conftest.py sets for local runs
        "ORCHESTRA_MLFLOW_RETRY_TIMEOUT_S": "600",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
        "OMP_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _children(pid: int) -> list[int]:
    out = []
    for p in _all_pids():
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(p)
    return out


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=60)


class Host:
    """One test machine: network, PID and mount namespaces; commands run inside all three."""

    def __init__(self, lab: Lab, letter: str, index: int):
        self.lab = lab
        self.netns = f"{lab.tag}{letter}"
        self.ip = f"{SUBNET}.{index}"
        self.dir = lab.dir / letter
        self.home = self.dir / "home"
        self.raytmp = self.dir / "raytmp"
        self.home.mkdir(parents=True)
        self.raytmp.mkdir()
        _ip("netns", "add", self.netns)
        lab.netns.append(self.netns)
        _ip("link", "add", "eth0", "netns", self.netns, "type", "veth", "peer", "name", f"v{letter}",
            "netns", lab.hub)
        _ip("-n", lab.hub, "link", "set", f"v{letter}", "master", "br0", "up")
        _ip("-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        # unshare forks the namespace's init; --kill-child: if unshare dies, the init is SIGKILLed.
        self.unshare = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount-proc",
             "--propagation", "private", "--kill-child", sys.executable, "-c", _INIT],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.init_pid = self._find_init()
        self.pidns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        Path("/tmp/ray").mkdir(exist_ok=True)  # mount point for the private Ray temp dir
        sh = {"PATH": "/usr/bin:/bin"}
        # The interpreter may live under the real /root (pyenv): keep it visible in the private home.
        base = Path(os.path.realpath(sys.base_prefix))
        if base.is_relative_to("/root"):
            top = Path("/root", base.relative_to("/root").parts[0])
            (self.home / top.name).mkdir()
            self.run(["mount", "--rbind", str(top), str(self.home / top.name)], env=sh, check=True)
        self.run(["mount", "--rbind", str(self.home), "/root"], env=sh, check=True)
        self.run(["mount", "--bind", str(self.raytmp), "/tmp/ray"], env=sh, check=True)

    def _find_init(self, timeout: float = 300) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for k in _children(self.unshare.pid):
                try:  # the init after its exec: in the new PID namespace, running the init script
                    if os.readlink(f"/proc/{k}/ns/pid") != os.readlink("/proc/self/ns/pid") and \
                            _INIT.encode() in Path(f"/proc/{k}/cmdline").read_bytes():
                        return k
                except (FileNotFoundError, ProcessLookupError):
                    continue
            if self.unshare.poll() is not None:
                raise RuntimeError(f"unshare for {self.netns} exited with {self.unshare.returncode}")
            time.sleep(0.05)
        raise TimeoutError(f"no init process in {self.netns}")

    def _argv(self, cmd: list[str] | str) -> list[str]:
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["nsenter", "-t", str(self.init_pid), "-p", "-m", "-n", "--", *argv]

    def popen(self, cmd: list[str] | str, env: dict[str, str] | None = None, log: Path | None = None,
              **kw) -> subprocess.Popen:
        """Start ``cmd`` inside the host (env: :func:`ray_env` unless given); output to ``log``."""
        out = open(log, "ab") if log else subprocess.PIPE
        kw.setdefault("stdout", out)
        kw.setdefault("stderr", subprocess.STDOUT)
        return subprocess.Popen(self._argv(cmd), env=env if env is not None else ray_env(),
                                stdin=subprocess.DEVNULL, start_new_session=True, **kw)

    def run(self, cmd: list[str] | str, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = False, cwd: str | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(self._argv(cmd), env=env if env is not None else ray_env(), cwd=cwd,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{self.netns}: {cmd!r} exited {res.returncode}:\n{res.stdout[-3000:]}\n"
                               f"{res.stderr[-3000:]}")
        return res

    def pids(self) -> list[int]:
        """Host PIDs of every process in this host's PID namespace except its init."""
        out = []
        for p in _all_pids():
            if p == self.init_pid:
                continue
            try:
                if os.readlink(f"/proc/{p}/ns/pid") == self.pidns:
                    out.append(p)
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
        return out

    def procs(self) -> list[str]:
        names = []
        for p in self.pids():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError):
                continue
            names.append(f"{p} {cmd[:150]}")
        return names

    def alive(self) -> bool:
        return Path(f"/proc/{self.init_pid}").exists() and self.unshare.poll() is None

    def kill(self) -> None:
        """SIGKILL the host's init: the kernel kills every process of its PID namespace."""
        for pid in (self.init_pid, self.unshare.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.unshare.wait(30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 30
        while self.pids() and time.time() < deadline:
            time.sleep(0.2)
        for p in self.pids():  # not reached in practice: the kernel empties the namespace
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Lab:
    """A set of test hosts (:class:`Host`) on the bridge of one hub namespace; ``close()`` removes all."""

    def __init__(self, root: Path, tag: str | None = None):
        self.tag = tag or f"orch{os.getpid() % 100000}x{int(time.time() * 1000) % 1000}"
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hub = f"{self.tag}h"
        self.netns: list[str] = []
        self.hosts: list[Host] = []
        _ip("netns", "add", self.hub)
        self.netns.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, letter: str, index: int) -> Host:
        if not 1 <= index <= 254:
            raise ValueError(f"host index must be in 1..254 (got {index})")
        host = Host(self, letter, index)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.kill()
        for ns in reversed(self.netns):  # deleting a namespace deletes its veth ends
            _ip("netns", "del", ns, check=False)
        for host in self.hosts:  # bind mounts lived in the killed mount namespaces
            shutil.rmtree(host.raytmp, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5, fail=None):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass. ``fail``, if
    given, is called before each poll: what it raises ends the wait at once (a daemon that died)."""
    deadline = time.time() + timeout
    last_exc: Exception | None = None
    while time.time() < deadline:
        if fail is not None:
            fail()
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - polled state may not exist yet
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_exc})"
                                                                             if last_exc else ""))


def have_namespaces() -> str | None:
    """None if this machine can run the namespace tests, else the reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None
