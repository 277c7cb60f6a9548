"""Shared fixtures: a real local Ray cluster on 127.0.0.1, real MLflow stores and servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Set before Ray is imported anywhere: keep Ray on loopback and away from its usage-stats host.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_REPORT_URL", "http://127.0.0.1:9/")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
# Generous deadlines, not fixed short timeouts: on 2 shared, busy cores delivering a launch to MLflow
# can take longer than the callback's 30 s default, and one request longer than MLflow's 10 s (a request
# that timed out after the server stored it would be sent again). Subprocesses inherit both.
os.environ.setdefault("ORCHESTRA_MLFLOW_RETRY_TIMEOUT_S", "600")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")

from orchestration.env import set_local_ray_env  # noqa: E402 - after the variables above

set_local_ray_env()

ROOT = Path(__file__).resolve().parents[1]


# The files whose tests take minutes (from `make test`'s --durations report), longest first. pytest-xdist's
# loadfile hands whole files to the workers in collection order, so starting the longest ones first keeps
# one worker from running a long file alone at the end (longest-processing-time-first scheduling).
LONG_FILES = ("test_runner.py", "test_multinode.py", "test_slurm.py", "test_server.py", "test_eve.py",
              "test_tracking.py", "test_report.py", "test_cli_errors.py", "test_console.py", "test_wpo.py",
              "test_ui.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` s (a deadline, not a timing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def chromium() -> str | None:
    """Debian's Chromium for the browser tests (installed with apt-get when missing and possible)."""
    import shutil

    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=900,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return shutil.which("chromium")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range: a client connecting to a port
    in that range while nothing listens there (a server being restarted) can be given the same port
    as its source and connect to itself, which would then keep the server from binding it."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.sample(range(10000, max(10001, low)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray cluster on 127.0.0.1 for the whole session (2 CPUs)."""
    import ray

    from orchestration.runner import init_ray

    for attempt in range(3):  # Ray gives its raylet a fixed time to register; retry on a loaded machine
        try:
            init_ray(num_cpus=2)
            break
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 with a SQLite store; stop() and start() again."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.uri = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--default-artifact-root", str(self.root / "artifacts"),
            "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
        ]

    def start(self, timeout: float = 300.0) -> None:
        log = open(self.root / f"server-{time.time():.0f}.log", "w")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.time() + timeout
        import urllib.request

        while time.time() < deadline:  # poll for health; a loaded machine may take minutes
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=10) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: see {log.name}")
            time.sleep(0.3)
        self.stop()  # never leave a half-started server behind
        raise TimeoutError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            import signal

            # SIGTERM: the server finishes the requests it has (a request cut by SIGKILL after the
            # store took it would be retried by the client and logged twice); allowed a minute.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)  # `orchestra server` gives its MLflow server 60 s
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(60)
        self.proc = None


class AuthMlflowServer(MlflowServer):
    """`orchestra server` (MLflow's basic-auth app) on 127.0.0.1; the admin's password in a 0600 file.
    Stopping it SIGTERMs `orchestra server`, which stops the MLflow server it started."""

    ADMIN = "admin"
    ADMIN_PASSWORD = "test-admin-Passw0rd-not-a-default"  # test-only

    def __init__(self, root: Path):
        super().__init__(root)
        self.password_file = root / "admin_password"
        self.password_file.write_text(self.ADMIN_PASSWORD)
        self.password_file.chmod(0o600)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "orchestration.cli", "server", "--root", str(self.root / "server"),
                "--port", str(self.port), "--admin-password-file", str(self.password_file)]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()
