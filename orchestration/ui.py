"""`orchestra ui`: the MLflow UI of a local store on 127.0.0.1, opened on an experiment's runs table.

MLflow 3's UI opens experiments on their GenAI overview unless they are tagged as model training
(:func:`orchestration.tracking.mark_training_experiment`); the runs route picks the model-training view
from ``workflowType=machine_learning`` in its URL, and a saved view (:func:`save_runs_view`) shows the
launch's metric as a column, best first. The server runs in its own process group, stopped as a whole
when `orchestra ui` gets SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ML_VIEW = "workflowType=machine_learning"  # the MLflow 3 UI's model-training view (not the GenAI one)


def ui_experiment(uri: str, name: str | None):
    """(experiment, saved view key or None) that ``orchestra ui`` opens: ``name`` (UserError listing the
    experiments if there is none), else the experiment of the most recent run ((None, None) when the
    store has no runs). An experiment holding orchestra launches is tagged as a model-training
    experiment when it has no kind yet (so that the MLflow UI opens it on its runs table) and gets the
    saved view of :func:`save_runs_view`."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from orchestration.tracking import mark_training_experiment, require_experiment

    client = MlflowClient(uri)
    if name is not None:
        exp = require_experiment(client, name, uri)
    else:
        ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
        if not runs:
            return None, None
        exp = client.get_experiment(runs[0].info.experiment_id)
    if not client.search_runs([exp.experiment_id], "tags.`orchestra.run_type` = 'launch'", max_results=1):
        return exp, None
    mark_training_experiment(client, exp)
    return exp, save_runs_view(client, exp)


VIEW_KEY = "orchestra"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY  # MLflow 3 UI saved views: one experiment tag per view


def save_runs_view(client, exp) -> str | None:
    """Save (or refresh) the MLflow UI view ``orchestra`` of ``exp``: the runs table sorted by the newest
    launch's metric, best first, with that metric and the params that vary across trials as columns.
    Returns the view key, or None when the experiment has no launch with a metric.

    The tag is what the UI's "Views > Save as new view" writes: an envelope {name, createdAt, updatedAt,
    state} whose state holds search facets (``orderByKey``, ``orderByAsc``) and UI state
    (``selectedColumns``); ``?viewStateShareKey=<key>`` opens it. Sorted by anything but the start time,
    the UI lists child runs as rows of their own instead of folding them under their parent."""
    import json

    launches = client.search_runs([exp.experiment_id], "tags.`orchestra.run_type` = 'launch'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    metric = launches[0].data.tags.get("orchestra.metric") if launches else None
    if not metric:
        return None
    mode = launches[0].data.tags.get("orchestra.mode", "max")
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{launches[0].info.run_id}'",
                              max_results=1000)
    keys = sorted({k for r in kids for k in r.data.params if not k.startswith("_orchestra")})
    varying = [k for k in keys if len({r.data.params.get(k) for r in kids}) > 1][:8]
    state = {"orderByKey": f"metrics.`{metric}`", "orderByAsc": mode == "min",
             "selectedColumns": [f"metrics.`{metric}`", *(f"params.`{k}`" for k in varying)]}
    now = int(time.time() * 1000)
    old = (exp.tags or {}).get(VIEW_TAG)
    created = now
    if old:
        try:
            envelope = json.loads(old)
            if envelope.get("state") == json.dumps(state):
                return VIEW_KEY
            created = int(envelope.get("createdAt", now))
        except (ValueError, TypeError, AttributeError):
            pass
    client.set_experiment_tag(exp.experiment_id, VIEW_TAG, json.dumps(
        {"name": f"orchestra: {metric} ({'lowest' if mode == 'min' else 'highest'} first)",
         "createdAt": created, "updatedAt": now, "state": json.dumps(state)}))
    return VIEW_KEY


def runs_page_url(base: str, experiment_id: str, view: str | None = None) -> str:
    """The MLflow 3 UI's runs table of an experiment (hash route ``/experiments/<id>/runs``), in the
    model-training view, optionally opening a saved view."""
    share = f"viewStateShareKey={view}&" if view else ""
    return f"{base}/#/experiments/{experiment_id}/runs?{share}{ML_VIEW}"


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists (signal 0 probes without sending)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc`` (started with start_new_session=True), wait for the
    whole group until ``timeout``, then SIGKILL what is left."""
    pgid = proc.pid
    if process_group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, else its zombie keeps the group "alive"
        if not process_group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass



def run_until_signalled(cmd: list[str], env: dict[str, str] | None = None, stop_timeout: float = 10.0, *,
                        ready: Callable[[subprocess.Popen], bool] | None = None, **popen: Any) -> int:
    """Run ``cmd`` in its own session until it exits or we get SIGTERM/SIGINT, then stop its whole process
    group (:func:`stop_process_group`): stopping us (Ctrl-C, SIGTERM) stops the server and its workers, and a
    terminal's Ctrl-C reaches the server only through us. Returns 0 when stopped by a signal, else its exit code.

    ``ready(proc)``, when given, is polled until it returns True (before each poll of the process; it sees the
    process exit first); an exception it raises stops the group and propagates. ``popen`` goes to Popen."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **popen)
    stopped: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stopped.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        waiting = ready is not None
        while not stopped:
            if waiting and ready(proc):
                waiting = False
            if proc.poll() is not None:
                break
            try:
                proc.wait(0.2 if waiting else 0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        try:
            stop_process_group(proc, timeout=stop_timeout)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0 if stopped else proc.returncode

def serve(uri: str, port: int, experiment: str | None) -> int:
    """Run ``mlflow ui`` for ``uri`` on 127.0.0.1:``port`` until it exits or we get SIGTERM/SIGINT; print
    the runs page of ``experiment`` (default: the experiment of the most recent run)."""
    exp, view = ui_experiment(uri, experiment)
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", uri]
    print(f"MLflow UI for {uri} at {base} (Ctrl-C to stop)")
    if exp is not None:
        print(f"runs of experiment {exp.name!r}: {runs_page_url(base, exp.experiment_id, view)}")
    sys.stdout.flush()
    return run_until_signalled(cmd)


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _loopback_port(uri: str) -> int | None:
    """The port of an http URI on the head's loopback (``http://127.0.0.1:5000``), else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        return None
    return parts.port or 80


def serve_cluster(file: str, port: int | None, dash_port: int | None, experiment: str | None,
                  connect_timeout: int = 30) -> int:
    """Forward the head's MLflow server (``metadata.orchestra.tracking_uri``, on the head's loopback) and
    Ray dashboard to 127.0.0.1 here over one SSH connection (orchestration.tunnel), print their local
    URLs and the runs page of ``experiment`` (default: that of the most recent run), and keep the tunnel
    until we get SIGTERM/SIGINT (:func:`run_until_signalled`). ``port``/``dash_port`` None: free ports.
    A cluster file that is missing or invalid, or a head that SSH cannot reach, is a UserError."""
    from orchestration.launch import _free_port, cluster_info
    from orchestration.spec import UserError, load_yaml_mapping
    from orchestration.tunnel import dashboard_port, find_head, forward_command

    info = cluster_info(file)  # Ray's validator and ours (SpecError names file and key)
    raw = load_yaml_mapping(file, "cluster config")
    head = find_head(file, raw)
    remote_mlflow = _loopback_port(info.tracking_uri)
    if port is not None and port == dash_port:
        raise UserError(f"--port {port} and --dashboard-port {dash_port}: the two forwards need two ports")

    def pick(fixed: int | None, other: int | None) -> int:
        chosen = fixed or _free_port()
        while chosen == other:  # a free pick may hit the other forward's port
            chosen = _free_port()
        return chosen

    local_mlflow = pick(port, dash_port) if remote_mlflow else None
    local_dash = pick(dash_port, local_mlflow)
    forwards = [(local_dash, dashboard_port(raw))]
    if remote_mlflow:
        forwards.insert(0, (local_mlflow, remote_mlflow))
    cmd = forward_command(head, forwards, connect_timeout)
    err = tempfile.TemporaryFile(mode="w+")
    deadline = time.monotonic() + connect_timeout + 60

    def ssh_error() -> str:
        err.seek(0)
        lines = [line.strip() for line in err.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no message from ssh"

    def ready(proc: subprocess.Popen) -> bool:
        if proc.poll() is not None:
            raise UserError(f"{file}: cannot reach the head of cluster {info.name!r} over SSH as {head.target} "
                            f"(ssh exited with {proc.returncode}: {ssh_error()})")
        if not all(_port_open(local) for local, _ in forwards):
            if time.monotonic() > deadline:
                raise UserError(f"{file}: no SSH port forward to {head.target} after "
                                f"{connect_timeout + 60} s ({ssh_error()})")
            return False
        _print_cluster_urls(info, head, forwards, remote_mlflow, experiment)
        return True

    try:
        rc = run_until_signalled(cmd, ready=ready, stdin=subprocess.DEVNULL, stderr=err)
        if rc:
            print(f"error: the SSH tunnel to {head.target} closed (ssh exited with {rc}: {ssh_error()})",
                  file=sys.stderr)
        return rc
    finally:
        err.close()


def _print_cluster_urls(info: Any, head: Any, forwards: list[tuple[int, int]], remote_mlflow: int | None,
                        experiment: str | None) -> None:
    from mlflow.exceptions import MlflowException

    print(f"cluster {info.name!r}: head {head.target}, forwarded over SSH (Ctrl-C closes the tunnel)")
    if remote_mlflow:
        local = forwards[0][0]
        base = f"http://127.0.0.1:{local}"
        print(f"MLflow UI: {base}  (the head's 127.0.0.1:{remote_mlflow})")
        try:
            exp, view = ui_experiment(base, experiment)
        except MlflowException as e:  # e.g. a server with authentication and no credentials here
            print(f"(could not read the experiments: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
            exp = view = None
        if exp is not None:
            print(f"runs of experiment {exp.name!r}: {runs_page_url(base, exp.experiment_id, view)}")
    else:
        print(f"MLflow: {info.tracking_uri} (not on the head's loopback: open it directly)")
    dash_local, dash_remote = forwards[-1]
    token = f"; the dashboard asks for the cluster token ({info.token_path or Path.home() / '.ray' / 'auth_token'})" \
        if info.token_auth else ""
    print(f"Ray dashboard: http://127.0.0.1:{dash_local}  (the head's 127.0.0.1:{dash_remote}{token})")
    sys.stdout.flush()
