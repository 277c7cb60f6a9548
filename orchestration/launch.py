"""`orchestra launch SPEC --cluster FILE`: run a spec as a Ray Job on a `ray up` cluster.

Steps (each one a Ray tool; nothing here schedules or transports anything itself):

1. Validate the spec locally (names resolve) and the cluster config (:func:`validate_cluster`).
2. Make sure the cluster is up: ``ray exec FILE 'ray status'``; if that fails, ``ray up -y FILE``.
3. Reach the head's dashboard (the Jobs API): by default through ``ray dashboard FILE -p PORT``
   (SSH port-forwarding; the dashboard listens on the head's 127.0.0.1 and no port is opened), or
   at ``--dashboard-address`` (e.g. a local-provider head's private address).
4. Submit ``orchestra run SPEC --address auto --launch-name NAME --set ...`` as a Ray Job. The job's
   runtime_env ``working_dir`` is the project (without .venv, runs/, mlruns/, .git): a throwaway copy
   on the head, so everything the launch must keep points at head-side absolute paths or object
   storage: ``tracking.uri`` -> the head's MLflow server (``http://127.0.0.1:5000`` by default),
   ``tracking.storage`` -> the cluster's Tune storage (S3 for multi-node), ``tracking.artifacts`` ->
   the cluster's artifact location. The git commit and the launch command line are recorded here,
   at launch, and passed to the job (``ORCHESTRA_GIT_COMMIT``, ``ORCHESTRA_COMMAND``).
5. Stream the job's logs (Tune's progress table) until it ends, unless ``--detach``; print how to
   open the MLflow UI (``orchestra ui EXPERIMENT --cluster FILE``: an SSH tunnel to the head).

Cluster settings for launches live under the config's ``metadata.orchestra`` block (Ray does not
interpret ``metadata``)::

    metadata:
      orchestra:
        storage: s3://my-bucket/orchestra/runs      # Tune storage_path (required for multi-node)
        artifacts: s3://my-bucket/orchestra/mlflow  # MLflow artifact location (default ~/mlruns/artifacts)
        tracking_uri: http://127.0.0.1:5000         # MLflow server on the head's loopback (default)

Token authentication: the client sends the cluster token from the local file that ``file_mounts``
copies to ``~/.ray/auth_token`` on every node (made with ``ray get-auth-token --generate``).

Tracking credentials (a head-side MLflow server with authentication, docs/clusters.md): the spec's
``tracking.credentials_file`` is read here, where the file is, else ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` are taken from this process's environment (:func:`job_credentials`); they
travel only in the job's ``runtime_env`` ``env_vars``, where the job's driver (the tracking callback)
finds them. The job's spec gets ``tracking.credentials_file=null``, a credentials file inside the
project is excluded from the ``working_dir`` upload, and neither the entrypoint nor anything printed
holds them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.cluster import is_multi_node, orchestra_metadata, validate_cluster
from orchestration.spec import SpecError

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
DEFAULT_ARTIFACTS = "~/mlruns/artifacts"
DEFAULT_SINGLE_NODE_STORAGE = "~/orchestra-runs"
REMOTE_TOKEN_PATHS = ("~/.ray/auth_token", "/root/.ray/auth_token")
# Shipped with every job: the project without environments, results and VCS data.
JOB_EXCLUDES = [".venv", "venv", "runs", "mlruns", "reports", ".git", "**/__pycache__", ".pytest_cache",
                ".ruff_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class ClusterInfo:
    """What a launch needs from a validated cluster config."""

    file: Path
    name: str
    multi_node: bool
    storage: str | None
    artifacts: str
    tracking_uri: str
    token_auth: bool
    token_path: Path | None


def _ray_cli() -> str:
    ray = Path(sys.executable).with_name("ray")
    return str(ray) if ray.exists() else "ray"


def cluster_info(file: str | Path) -> ClusterInfo:
    """Validate ``file`` (Ray's validator and ours) and read the launch settings from it."""
    import yaml

    validate_cluster(file)
    raw = yaml.safe_load(Path(file).read_text())
    meta = orchestra_metadata(raw)
    token_path = None
    for remote, local in (raw.get("file_mounts") or {}).items():
        if remote in REMOTE_TOKEN_PATHS:
            token_path = Path(os.path.expanduser(str(local)))
            if not token_path.is_absolute():
                token_path = (Path(file).resolve().parent / token_path).resolve()
    text = "\n".join(str(c) for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                     for c in raw.get(key) or [])
    return ClusterInfo(
        file=Path(file).resolve(), name=str(raw.get("cluster_name", "default")), multi_node=is_multi_node(raw),
        storage=meta.get("storage"), artifacts=meta.get("artifacts") or DEFAULT_ARTIFACTS,
        tracking_uri=meta.get("tracking_uri") or DEFAULT_TRACKING_URI,
        token_auth="RAY_AUTH_MODE=token" in text, token_path=token_path)


def _head_ready(value: str) -> bool:
    """A path or URI that means the same on the head: a URI (s3://, http://) or an absolute path."""
    return "://" in value or value.startswith(("/", "~"))


def head_overrides(spec: Any, info: ClusterInfo, storage: str | None = None) -> list[str]:
    """``--set`` overrides that point the job's tracking and storage at head-side locations.

    Relative paths in a spec mean "next to the spec" locally; in a job they would land in the
    throwaway working_dir copy, so they are replaced by the cluster's settings.
    """
    t = spec.tracking
    out = []
    uri = t.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = info.tracking_uri
    elif "://" not in uri and not uri.startswith("/"):
        uri = info.tracking_uri
    out.append(f"tracking.uri={uri}")
    chosen = storage or (t.storage if _head_ready(t.storage) else None) or info.storage
    if chosen is None:
        if info.multi_node:
            raise SpecError(str(info.file), "metadata.orchestra.storage",
                            "a multi-node cluster needs Tune storage every node can reach",
                            allowed="metadata.orchestra.storage: s3://bucket/prefix in the cluster file, "
                                    "or `orchestra launch --storage s3://...`")
        chosen = DEFAULT_SINGLE_NODE_STORAGE
    if info.multi_node and not ("://" in chosen or info_is_local(info)):
        raise SpecError(str(info.file), "metadata.orchestra.storage",
                        "multi-node Tune needs shared storage", chosen, allowed="an s3:// (or gs://) URI")
    out.append(f"tracking.storage={chosen}")
    art = t.artifacts if _head_ready(t.artifacts) else info.artifacts
    out.append(f"tracking.artifacts={art}")
    if t.credentials_file:  # a local file: its values travel in the job's env_vars (job_credentials)
        out.append("tracking.credentials_file=null")
    return out


def job_credentials(spec: Any, tracking_uri: str) -> dict[str, str]:
    """The tracking server's username and password for the job's driver: from the spec's
    ``tracking.credentials_file`` (relative paths from the current folder, as ``orchestra run`` reads
    them), else ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` of this process; {} when the
    job's ``tracking_uri`` is not a server or no credentials are set."""
    from orchestration.tracking.access import PASSWORD_ENV, USERNAME_ENV, is_server_uri, read_credentials_file

    if not is_server_uri(tracking_uri):
        return {}
    if spec.tracking.credentials_file:
        user, password = read_credentials_file(credentials_path(spec))
        return {USERNAME_ENV: user, PASSWORD_ENV: password}
    if os.environ.get(USERNAME_ENV) and os.environ.get(PASSWORD_ENV):
        return {USERNAME_ENV: os.environ[USERNAME_ENV], PASSWORD_ENV: os.environ[PASSWORD_ENV]}
    return {}


def credentials_path(spec: Any) -> Path | None:
    f = spec.tracking.credentials_file
    return (Path.cwd() / os.path.expanduser(f)).resolve() if f else None


def info_is_local(info: ClusterInfo) -> bool:
    import yaml

    raw = yaml.safe_load(info.file.read_text())
    return (raw.get("provider") or {}).get("type") == "local"


def job_entrypoint(spec_file: Path, project_dir: Path, overrides: list[str], launch_name: str) -> str:
    """The job's shell command: `orchestra run` of the spec inside the shipped working_dir.

    A spec outside the project is written into the job's working_dir copy (``.orchestra/``).
    """
    spec_file = spec_file.resolve()
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    tail = f"--address auto --launch-name {shlex.quote(launch_name)} {sets}".strip()
    if spec_file.is_relative_to(project_dir.resolve()):
        return f"orchestra run {shlex.quote(str(spec_file.relative_to(project_dir.resolve())))} {tail}"
    b64 = base64.b64encode(spec_file.read_bytes()).decode()
    rel = f".orchestra/{spec_file.name}"
    return (f"mkdir -p .orchestra && echo {b64} | base64 -d > {shlex.quote(rel)} && "
            f"orchestra run {shlex.quote(rel)} {tail}")


def job_runtime_env(project_dir: Path, git_commit: str, command: str, credentials: dict[str, str] | None = None,
                    credentials_file: Path | None = None) -> dict[str, Any]:
    """The job's runtime_env: the project as ``working_dir`` (without :data:`JOB_EXCLUDES` and without
    ``credentials_file`` when it lies inside the project), the launch's commit and command, and the
    tracking ``credentials`` (:func:`job_credentials`) as env_vars of the driver."""
    project = project_dir.resolve()
    excludes = list(JOB_EXCLUDES)
    if credentials_file is not None and credentials_file.resolve().is_relative_to(project):
        excludes.append("/" + credentials_file.resolve().relative_to(project).as_posix())  # anchored at the root
    return {
        "working_dir": str(project),
        "excludes": excludes,
        "env_vars": {
            "ORCHESTRA_GIT_COMMIT": git_commit,
            "ORCHESTRA_COMMAND": command[:4000],
            # The job driver joins the cluster: Ray's multi-node mode (Linux default), whatever the
            # local loopback default of `orchestra` says.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "PYTHONUNBUFFERED": "1",
            **(credentials or {}),
        },
    }


def job_submission(spec_path: Path, spec: Any, sets: list[str], project: Path, name: str, commit: str,
                   command: str) -> dict[str, Any]:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for a launch: entrypoint (no
    secrets: :func:`job_status` shows it), submission id and runtime_env (:func:`job_runtime_env`)."""
    uri = next(s.split("=", 1)[1] for s in sets if s.startswith("tracking.uri="))
    env = job_runtime_env(project, commit, command, job_credentials(spec, uri), credentials_path(spec))
    return {"entrypoint": job_entrypoint(spec_path, project, sets, name), "submission_id": name, "runtime_env": env}


# ----------------------------------------------------------------------------------------------
# Cluster and dashboard
# ----------------------------------------------------------------------------------------------
def _run(cmd: list[str], out: Callable[[str], None], timeout: float, stream: bool = True,
         env: dict[str, str] | None = None) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        if stream:
            out(line.rstrip("\n"))
        if time.time() > deadline:
            proc.kill()
            break
    try:
        return proc.wait(max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def cluster_is_up(info: ClusterInfo, out: Callable[[str], None] = print, timeout: float = 300) -> bool:
    """``ray exec FILE 'ray status'`` succeeds: the head exists and Ray runs on it."""
    rc = _run([_ray_cli(), "exec", str(info.file), "ray status", "--no-config-cache"], out, timeout, stream=False)
    return rc == 0


def ensure_token(info: ClusterInfo, out: Callable[[str], None] = print) -> None:
    """The client side of token auth: RAY_AUTH_MODE=token and the cluster token for this process.

    The token is the local file that ``file_mounts`` copies to ``~/.ray/auth_token`` on every node;
    if it is Ray's default path and missing, ``ray get-auth-token --generate`` creates it.
    """
    if not info.token_auth:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    path = info.token_path
    if path is None:
        return
    if not path.exists():
        default = Path.home() / ".ray" / "auth_token"
        if path != default:
            raise SpecError(str(info.file), "file_mounts", f"token file {path} does not exist",
                            allowed="create it with `ray get-auth-token --generate` and copy ~/.ray/auth_token")
        out("generating the cluster token: ray get-auth-token --generate")
        subprocess.run([_ray_cli(), "get-auth-token", "--generate"], capture_output=True, check=True, timeout=120)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


def ray_up(info: ClusterInfo, out: Callable[[str], None] = print, timeout: float = 3600) -> None:
    """``ray up -y FILE``. On-prem (local provider) clusters use Ray's v1 autoscaler: with v2 (the
    default of `ray up` in Ray 2.60) a head started from another machine marks itself terminated in
    its own local-provider state and never starts the workers (seen in tests/test_multinode.py)."""
    out(f"starting the cluster: ray up -y {info.file}")
    env = None
    if info_is_local(info) and "RAY_UP_enable_autoscaler_v2" not in os.environ:
        env = {**os.environ, "RAY_UP_enable_autoscaler_v2": "0"}
    rc = _run([_ray_cli(), "up", "-y", str(info.file), "--no-config-cache"], out, timeout, env=env)
    if rc != 0:
        raise RuntimeError(f"`ray up -y {info.file}` exited with {rc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_ok(address: str) -> bool:
    """The dashboard answers (with this process's token when token auth is on)."""
    from algorithms.ray_compat import RayPrivateAPIError, auth_headers_if_auth_enabled

    try:
        headers = auth_headers_if_auth_enabled({})
    except RayPrivateAPIError:
        raise
    except Exception:  # noqa: BLE001 - no token: the Jobs client reports the auth error itself
        headers = {}
    try:
        req = urllib.request.Request(address.rstrip("/") + "/api/version", headers=headers)
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:  # it answered: reachable (401/403 are reported on submit)
        return e.code in (401, 403)
    except OSError:
        return False


class DashboardForward:
    """``ray dashboard FILE -p PORT``: the head's dashboard at http://127.0.0.1:PORT over SSH."""

    def __init__(self, info: ClusterInfo, timeout: float = 300):
        self.info = info
        self.port = _free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> DashboardForward:
        self.proc = subprocess.Popen([_ray_cli(), "dashboard", str(self.info.file), "-p", str(self.port),
                                      "--no-config-cache"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if _dashboard_ok(self.address):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        self.close()
        raise RuntimeError(f"could not reach the head's dashboard through `ray dashboard {self.info.file}`")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc = None

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Direct:
    def __init__(self, address: str):
        self.address = address if "://" in address else f"http://{address}"

    def __enter__(self) -> _Direct:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def dashboard(info: ClusterInfo, address: str | None) -> Any:
    """Context manager giving ``.address``: the given dashboard address, or an SSH forward."""
    return _Direct(address) if address else DashboardForward(info)


def job_client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _status(client: Any, job_id: str) -> str:
    st = client.get_job_status(job_id)
    return str(getattr(st, "value", st))


def stream_logs(client: Any, job_id: str, out: Callable[[str], None] = print) -> str:
    """Print the job's log lines as they come; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            for line in chunk.splitlines():
                out(line)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - a dropped log stream is not a job failure
        out(f"(log stream ended: {e}; polling the job status)")
    while True:
        status = _status(client, job_id)
        if status in TERMINAL:
            return status
        time.sleep(2)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
@dataclass
class LaunchResult:
    job_id: str
    status: str
    tracking_uri: str
    experiment: str

    @property
    def ok(self) -> bool:
        return self.status in ("SUCCEEDED", "PENDING", "RUNNING")


def ui_hint(info: ClusterInfo, tracking_uri: str, experiment: str, job_id: str) -> str:
    from urllib.parse import urlsplit

    on_head = urlsplit(tracking_uri).hostname in ("127.0.0.1", "localhost")  # the head's loopback server
    ui = (f"orchestra ui {shlex.quote(experiment)} --cluster {info.file}   (the head's MLflow server and Ray "
          "dashboard over SSH; Ctrl-C closes the tunnel)" if on_head else f"open {tracking_uri}")
    return "\n".join([
        f"MLflow UI: {ui}",
        f"           experiment {experiment!r}, run {job_id!r}",
        f"job:       orchestra status {job_id} --cluster {info.file}   |   orchestra stop {job_id} --cluster {info.file}",
    ])


def launch(
    spec_path: str | Path,
    cluster: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    detach: bool = False,
    dashboard_address: str | None = None,
    storage: str | None = None,
    project_dir: str | Path | None = None,
    start: bool = True,
    out: Callable[[str], None] = print,
) -> LaunchResult:
    """Run ``spec_path`` as a Ray Job on the cluster of ``cluster`` (see the module docstring)."""
    from orchestration.runner import _git_commit
    from orchestration.spec import load_spec

    spec_path = Path(spec_path)
    spec = load_spec(spec_path, list(overrides))  # locally: names resolve, errors name the key
    info = cluster_info(cluster)
    sets = [*overrides, *head_overrides(spec, info, storage)]
    project = Path(project_dir or Path.cwd()).resolve()
    name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    commit = _git_commit(project)  # the code the job runs: the shipped project
    command = " ".join(shlex.quote(a) for a in ["orchestra", *sys.argv[1:]]) if sys.argv else "orchestra launch"
    payload = job_submission(spec_path, spec, sets, project, name, commit, command)  # credentials read here
    ensure_token(info, out)
    if start and not cluster_is_up(info, out):
        ray_up(info, out)
    with dashboard(info, dashboard_address) as dash:
        client = job_client(dash.address)
        job_id = client.submit_job(**payload)
        out(f"submitted job {job_id} to cluster {info.name!r} (git {commit})")
        uri = next(s.split("=", 1)[1] for s in sets if s.startswith("tracking.uri="))
        experiment = spec.experiment_name
        if detach:
            out(ui_hint(info, uri, experiment, job_id))
            return LaunchResult(job_id, "RUNNING", uri, experiment)
        try:
            status = stream_logs(client, job_id, out)
        except KeyboardInterrupt:
            out(f"detached; the job keeps running (orchestra stop {job_id} --cluster {info.file})")
            return LaunchResult(job_id, "RUNNING", uri, experiment)
    out(f"job {job_id}: {status}")
    out(ui_hint(info, uri, experiment, job_id))
    return LaunchResult(job_id, status, uri, experiment)


def job_status(job_id: str, cluster: str | Path, dashboard_address: str | None = None) -> dict[str, Any]:
    info = cluster_info(cluster)
    ensure_token(info)
    with dashboard(info, dashboard_address) as dash:
        details = job_client(dash.address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(getattr(details.status, "value", details.status)),
            "message": details.message, "entrypoint": details.entrypoint,
            "start_time": details.start_time, "end_time": details.end_time}


def stop_job(job_id: str, cluster: str | Path, dashboard_address: str | None = None, wait: float = 60) -> str:
    info = cluster_info(cluster)
    ensure_token(info)
    with dashboard(info, dashboard_address) as dash:
        client = job_client(dash.address)
        client.stop_job(job_id)
        deadline = time.time() + wait
        status = ""
        while time.time() < deadline:
            status = _status(client, job_id)
            if status in TERMINAL:
                break
            time.sleep(1)
    return status
