"""`orchestra server`: a real MLflow basic-auth server on 127.0.0.1 (one per module), real Ray and Tune.

401 without or with wrong credentials, 403 without write permission, a launch with the right credentials
logs everything (artifacts through the server's proxy), wrong credentials stop `orchestra run` with one
line before any trial, and a server restart mid-sweep loses nothing."""

from __future__ import annotations

import base64
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import AuthMlflowServer, free_port
from mlflow import MlflowClient
from ray import cloudpickle

from orchestration.cli import main
from orchestration.runner import run
from orchestration.tracking import MLflowTracking

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ALICE, ALICE_PW = "alice", "alice-Passw0rd-test-only"
BOB, BOB_PW = "bob", "bob-Passw0rd-test-only"


def as_user(monkeypatch, user: str | None, password: str | None) -> None:
    for name, v in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if v is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, v)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `orchestra server` for the module, with users alice and bob (no permissions of their own) and
    an experiment 'team' made by the admin."""
    from mlflow.server import get_app_client

    s = AuthMlflowServer(tmp_path_factory.mktemp("auth-server"))
    s.start()
    try:
        mp = pytest.MonkeyPatch()
        as_user(mp, s.ADMIN, s.ADMIN_PASSWORD)
        auth = get_app_client("basic-auth", tracking_uri=s.uri)
        auth.create_user(ALICE, ALICE_PW)
        auth.create_user(BOB, BOB_PW)
        s.team_id = MlflowClient(s.uri).create_experiment("team")
        s.auth = auth
        mp.undo()
        yield s
    finally:
        s.stop()


def status_of(url: str, auth: str | None = None, method: str = "GET", body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_requests_without_or_with_wrong_credentials_get_401(server, monkeypatch, capsys):
    search = server.uri + "/api/2.0/mlflow/experiments/search?max_results=5"
    assert status_of(server.uri + "/health") == 200  # health stays open for load balancers
    assert status_of(search) == 401
    assert status_of(search, f"{ALICE}:wrong-password") == 401
    assert status_of(search, f"{ALICE}:{ALICE_PW}") == 200
    # The CLI: one line, exit 2, naming what to set.
    as_user(monkeypatch, None, None)
    monkeypatch.setenv("HOME", str(server.root))  # no ~/.mlflow/credentials of the machine's user
    assert main(["ls", "--uri", server.uri]) == 2
    assert "requires authentication (HTTP 401)" in one_error_line(capsys)
    as_user(monkeypatch, ALICE, "wrong-password")
    assert main(["ls", "--uri", server.uri]) == 2
    assert "rejected the password of user 'alice'" in one_error_line(capsys)


def test_user_without_permission_cannot_write_to_an_experiment(server, monkeypatch, tmp_path, capsys):
    as_user(monkeypatch, BOB, BOB_PW)
    client = MlflowClient(server.uri)
    body = f'{{"experiment_id": "{server.team_id}"}}'.encode()
    assert status_of(server.uri + "/api/2.0/mlflow/runs/create", f"{BOB}:{BOB_PW}", "POST", body) == 403
    # READ lets bob see the experiment, still not write to it: `orchestra run` stops before any trial.
    as_user(monkeypatch, server.ADMIN, server.ADMIN_PASSWORD)
    server.auth.grant_user_permission(BOB, "experiment", server.team_id, "READ")
    as_user(monkeypatch, BOB, BOB_PW)
    assert client.get_experiment_by_name("team").experiment_id == server.team_id
    assert status_of(server.uri + "/api/2.0/mlflow/runs/create", f"{BOB}:{BOB_PW}", "POST", body) == 403
    spec = tmp_path / "team.yaml"
    spec.write_text(f"name: team\ntask: regression_demo\nstop: {{training_iteration: 2}}\n"
                    f"tracking: {{uri: '{server.uri}', storage: '{tmp_path / 'runs'}'}}\n")
    assert main(["run", str(spec), "--launch-name", "bob-launch"]) == 2
    assert "user 'bob' may not write to experiment 'team' (HTTP 403)" in one_error_line(capsys)
    assert not (tmp_path / "runs" / "bob-launch").exists()
    assert not client.search_runs([server.team_id])


def test_run_with_wrong_credentials_fails_in_one_line_before_any_trial(server, monkeypatch, tmp_path, capsys):
    creds = tmp_path / "creds.ini"
    creds.write_text(f"[mlflow]\nmlflow_tracking_username = {ALICE}\nmlflow_tracking_password = not-hers\n")
    creds.chmod(0o600)
    as_user(monkeypatch, None, None)
    spec = tmp_path / "wrong.yaml"
    spec.write_text(f"name: wrong\ntask: regression_demo\nstop: {{training_iteration: 2}}\n"
                    f"tracking: {{uri: '{server.uri}', storage: '{tmp_path / 'runs'}', "
                    f"credentials_file: '{creds}'}}\n")
    assert main(["run", str(spec), "--launch-name", "wrong-launch"]) == 2
    assert "rejected the password of user 'alice' (HTTP 401)" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()
    creds.chmod(0o644)  # a credentials file others can read is refused, like an SSH key
    assert main(["run", str(spec)]) == 2
    assert "chmod 600" in one_error_line(capsys)


def test_sweep_with_credentials_file_logs_runs_metrics_and_proxied_artifacts(ray_local, server, monkeypatch,
                                                                              tmp_path):
    creds = tmp_path / "alice.ini"
    creds.write_text(f"[mlflow]\nmlflow_tracking_username = {ALICE}\nmlflow_tracking_password = {ALICE_PW}\n")
    creds.chmod(0o600)
    as_user(monkeypatch, "someone-else", "stale")  # the spec's file is the more specific setting
    out = run({"name": "alice_sweep", "task": "regression_demo", "config": {"write_weights": True},
               "seeds": [0, 1], "stop": {"training_iteration": 3},
               "tracking": {"uri": server.uri, "storage": str(tmp_path / "runs"), "credentials_file": str(creds)}})
    assert out.num_errors == 0 and len(out.trials) == 2
    as_user(monkeypatch, ALICE, ALICE_PW)
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("alice_sweep")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location  # proxied
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("orchestra.run_type") == "launch"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"spec.resolved.yaml",
                                                                                 "pip-freeze.txt"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        history = sorted(m.step for m in client.get_metric_history(child.info.run_id, "train/loss"))
        assert history == [20, 40, 60]
        local = client.download_artifacts(child.info.run_id, "weights.csv", str(tmp_path))
        assert Path(local).read_text().strip()
    stored = list((server.root / "server" / "artifacts").rglob("weights.csv"))
    assert len(stored) == 2  # on the server's disk, sent through its proxy
    # bob (no permission) does not see alice's experiment: NO_PERMISSIONS by default
    as_user(monkeypatch, BOB, BOB_PW)
    assert "alice_sweep" not in {e.name for e in MlflowClient(server.uri).search_experiments()}


@pytest.mark.slow
def test_server_restart_mid_sweep_loses_nothing_with_authentication(ray_local, server, monkeypatch, tmp_path):
    from test_tracking import LAUNCH_KW, ServerOutage, check_launch, make_tuner

    as_user(monkeypatch, ALICE, ALICE_PW)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: exp\n")
    cb = MLflowTracking(server.uri, "alice-outage", "launch-auth", launch_artifacts={"spec.yaml": str(spec)},
                        flush_interval_s=0.3, retry_timeout_s=600, **LAUNCH_KW)
    outage = ServerOutage(server, k=3, deadline_s=600)
    make_tuner(tmp_path, cb, [{"idx": 0}, {"idx": 1}, {"idx": 2, "fail_at": 3}], extra_callbacks=[outage]).fit()
    assert outage.thread is not None
    outage.thread.join(timeout=600)
    assert not outage.thread.is_alive() and outage.error is None, outage.error
    assert outage.enough.is_set() and outage.during >= 3, (outage.results, outage.during)
    check_launch(server.uri, "alice-outage", "launch-auth", 2, {2})


def test_server_needs_an_admin_password_on_first_start(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    args = ["server", "--root", str(tmp_path / "fresh"), "--port", str(free_port())]
    assert main(args) == 2
    assert "needs its password" in one_error_line(capsys) and not (tmp_path / "fresh" / "auth.db").exists()
    assert main([*args, "--host", "0.0.0.0"]) == 2
    assert "--allowed-hosts" in one_error_line(capsys)
    assert main([*args, "--default-permission", "ALL"]) == 2
    assert "allowed: NO_PERMISSIONS, READ, EDIT, MANAGE" in one_error_line(capsys)
