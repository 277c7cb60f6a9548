"""The real `orchestra` CLI on bad input: one line `error: ...` on stderr naming what was wrong and what is
allowed, exit code 2, never a traceback. Also --version and the MLFLOW_TRACKING_URI default of --uri."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRA = [sys.executable, "-m", "orchestration.cli"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    """A SQLite store shaped like a finished launch: experiment `study`, parent run `study-1`
    (orchestra.metric train/loss) with two nested trial runs."""
    root = tmp_path_factory.mktemp("cli_errors")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("study", artifact_location=str(root / "art"))
    parent = client.create_run(exp, run_name="study-1", tags={
        "orchestra.run_type": "launch", "orchestra.launch_id": "study-1", "orchestra.metric": "train/loss",
        "orchestra.mode": "min"})
    for i, lr in enumerate(("0.1", "0.01")):
        kid = client.create_run(exp, run_name=f"trial_{i}", tags={
            "mlflow.parentRunId": parent.info.run_id, "orchestra.run_type": "trial", "orchestra.launch_id": "study-1",
            "orchestra.trial_id": f"t{i}", "orchestra.seed": "0"})
        client.log_param(kid.info.run_id, "lr", lr)
        for step in (1, 2):
            client.log_metric(kid.info.run_id, "train/loss", 1.0 / (step + i), step=step)
        client.set_terminated(kid.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return root, uri


def orchestra(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full = {**base, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(ORCHESTRA + args, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (name, args with {uri} {root} placeholders, substrings the one error line must contain)
CASES = [
    ("ls-unknown-experiment", ["ls", "NOPE", "--uri", "{uri}"], ["'NOPE'", "existing", "Default", "study"]),
    ("report-unknown-experiment", ["report", "NOPE", "--uri", "{uri}"], ["'NOPE'", "study"]),
    ("report-unknown-metric", ["report", "study", "--uri", "{uri}", "--metric", "train/los"],
     ["'train/los'", "did you mean train/loss", "logged metrics: train/loss"]),
    ("report-unknown-launch", ["report", "study", "--uri", "{uri}", "--launch", "NOPE"], ["'NOPE'", "launches: study-1"]),
    ("ui-unknown-experiment", ["ui", "NOPE", "--uri", "{uri}", "--port", "{free_port}"], ["'NOPE'", "study"]),
    ("uri-unknown-scheme", ["ls", "--uri", "bogus://x"], ["'bogus://x'", "unsupported URI scheme 'bogus'", "sqlite:///"]),
    ("uri-missing-sqlite", ["report", "study", "--uri", "sqlite:///{root}/nope.db"],
     ["nope.db", "file not found"]),
    ("uri-not-a-database", ["ls", "--uri", "sqlite:///{root}/not_a_db.db"], ["not_a_db.db", "not a database"]),
    ("uri-unreachable-server", ["ls", "--uri", "http://127.0.0.1:{free_port}"], ["cannot reach", "127.0.0.1"]),
    ("ui-remote-uri", ["ui", "--uri", "http://127.0.0.1:{free_port}"], ["serves a local store"]),
    ("ui-port-in-use", ["ui", "--uri", "{uri}", "--port", "{busy_port}"], ["--port {busy_port}", "not free"]),
    ("ui-port-out-of-range", ["ui", "--uri", "{uri}", "--port", "70000"], ["--port 70000", "1..65535"]),
    ("ui-cluster-missing", ["ui", "--cluster", "{root}/nope_cluster.yaml"], ["nope_cluster.yaml", "not found"]),
    ("ui-cluster-yaml-syntax", ["ui", "--cluster", "{root}/broken.yaml"], ["broken.yaml:4:6: "]),
    ("ui-cluster-invalid", ["ui", "--cluster", "{root}/no_user_cluster.yaml"], ["no_user_cluster.yaml", "auth.ssh_user"]),
    ("ui-cluster-and-uri", ["ui", "--cluster", "{root}/no_user_cluster.yaml", "--uri", "{uri}"],
     ["--uri and --cluster"]),
    ("ui-cluster-port-in-use", ["ui", "--cluster", "{root}/no_user_cluster.yaml", "--dashboard-port", "{busy_port}"],
     ["--dashboard-port {busy_port}", "not free"]),
    ("ui-dashboard-port-without-cluster", ["ui", "--uri", "{uri}", "--dashboard-port", "{free_port}"],
     ["--dashboard-port", "only with --cluster"]),
    ("eval-missing-checkpoint", ["eval", "{root}/no_checkpoint"], ["no_checkpoint", "no such folder"]),
    ("eval-no-module", ["eval", "{root}", "--env", "CartPole-v1", "--no-log"], ["no RLModule found"]),
    ("eval-episodes", ["eval", "{root}", "--episodes", "0"], ["--episodes 0", "1 or more"]),
    ("eval-unknown-env", ["eval", "{root}", "--env", "CartPole-v9"], ["--env 'CartPole-v9'", "did you mean",
                                                                      "gymnasium ids"]),
    ("validate-missing-spec", ["validate", "{root}/missing.yaml"], ["missing.yaml", "spec file not found"]),
    ("run-missing-spec", ["run", "{root}/missing.yaml"], ["missing.yaml", "spec file not found"]),
    ("validate-folder", ["validate", "{root}"], ["cannot read the spec file"]),
    ("validate-yaml-syntax", ["validate", "{root}/broken.yaml"], ["{root}/broken.yaml:4:6: "]),
    ("validate-unknown-key", ["validate", "{root}/unknown_key.yaml"], ["unknown_key.yaml", "bogus_key"]),
    ("validate-bad-override", ["validate", "{root}/ok.yaml", "--set", "seeds=[1"], ["seeds", "not valid YAML"]),
    ("resume-unknown-launch", ["resume", "NOPE", "--storage", "{root}/runs"], ["'NOPE'"]),
    ("sync-missing-path", ["sync", "{root}/no_spool", "--uri", "{uri}"], ["no_spool", "no such file or folder"]),
    ("validate-cluster-missing", ["validate-cluster", "{root}/nope_cluster.yaml"], ["nope_cluster.yaml", "not found"]),
    ("validate-cluster-yaml-syntax", ["validate-cluster", "{root}/broken.yaml"], ["broken.yaml:4:6: "]),
    ("unknown-command", ["frobnicate"], ["invalid choice: 'frobnicate'", "report", "ui"]),
    ("bad-option-value", ["ls", "--uri", "{uri}", "--frob"], ["unrecognized arguments: --frob"]),
]


@pytest.mark.parametrize("name,args,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2(store, name: str, args: list[str], expect: list[str]):
    root, uri = store
    (root / "not_a_db.db").write_text("plain text, not SQLite\n")
    (root / "broken.yaml").write_text("name: broken\nconfig:\n  lr: [1, 2\nseeds: [0]\n")
    (root / "unknown_key.yaml").write_text("name: x\ntask: regression_demo\nbogus_key: 1\n")
    (root / "ok.yaml").write_text("name: ok\ntask: regression_demo\n")
    (root / "no_user_cluster.yaml").write_text(  # a local-provider cluster without auth.ssh_user
        "cluster_name: x\nprovider: {type: local, head_ip: 127.0.0.1, worker_ips: []}\n"
        "head_start_ray_commands: ['RAY_AUTH_MODE=token ray start --head']\n")
    (root / "runs").mkdir(exist_ok=True)
    busy = _busy_port()
    try:
        fill = {"uri": uri, "root": str(root), "free_port": str(_free_port()), "busy_port": str(busy.getsockname()[1])}
        res = orchestra([a.format(**fill) for a in args], cwd=root)
        line = one_error_line(res)
    finally:
        busy.close()
    for text in expect:
        assert text.format(**fill) in line, line


def test_version_names_the_installed_distribution(tmp_path: Path):
    res = orchestra(["--version"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"orchestra {version('orchestra-rl')}"


def test_uri_defaults_to_mlflow_tracking_uri(store, tmp_path: Path):
    _, uri = store
    res = orchestra(["ls"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert res.returncode == 0, res.stderr
    assert "study-1" in res.stdout and "trial_0" in res.stdout and "train/loss=" in res.stdout
    res = orchestra(["report", "study"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert res.returncode == 0, res.stderr
    assert "lr=0.1" in res.stdout and "lr=0.01" in res.stdout
    # --uri wins over the variable; the error says where the URI came from
    line = one_error_line(orchestra(["ls", "--uri", "bogus://y"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}))
    assert "--uri 'bogus://y'" in line
    line = one_error_line(orchestra(["ls"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/x.db"}))
    assert "$MLFLOW_TRACKING_URI" in line and f"{tmp_path}/x.db" in line
    # unset: the project default, relative to the working directory
    line = one_error_line(orchestra(["ls"], cwd=tmp_path))
    assert str(tmp_path / "mlruns" / "mlflow.db") in line
