"""`orchestra ui` against a real SQLite store holding a finished launch: the printed URL opens the MLflow 3
UI's runs table (model-training view) with the launch's parent run, its trial runs and the metric column,
rendered by headless Chromium; SIGTERM to `orchestra ui` stops its MLflow server too."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import conftest
import pytest
from mlflow import MlflowClient

from orchestration.runner import run
from orchestration.ui import process_group_alive

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRA = [sys.executable, "-m", "orchestration.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def launch(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = run({"name": "ui_study", "task": "regression_demo", "config": {"lr": {"grid": [0.02, 0.1]}},
               "seeds": [0], "stop": {"training_iteration": 2}, "metric": "train/loss", "mode": "min",
               "tracking": {"uri": uri, "storage": str(tmp / "runs"), "artifacts": str(tmp / "art")}})
    assert out.num_errors == 0
    return uri, tmp


def test_ui_experiment_tags_the_kind_and_saves_the_runs_view(launch):
    from orchestration.spec import UserError
    from orchestration.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from orchestration.ui import VIEW_TAG, runs_page_url, ui_experiment

    uri, _ = launch
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ui_study")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # set when the launch created it
    client.delete_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG)  # an experiment from before the tag
    found, view = ui_experiment(uri, "ui_study")
    assert found.experiment_id == exp.experiment_id and view == "orchestra"
    tags = client.get_experiment(exp.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert "metrics.`train/loss`" in tags[VIEW_TAG] and "params.`lr`" in tags[VIEW_TAG]
    assert ui_experiment(uri, None)[0].experiment_id == exp.experiment_id  # the most recent run's experiment
    with pytest.raises(UserError, match="'nope'.*ui_study"):
        ui_experiment(uri, "nope")
    assert runs_page_url("http://127.0.0.1:1", "7", "orchestra") == (
        "http://127.0.0.1:1/#/experiments/7/runs?viewStateShareKey=orchestra&workflowType=machine_learning")


@pytest.mark.slow
def test_ui_runs_page_in_chromium_and_sigterm_stops_the_server(launch, tmp_path: Path):
    uri, _ = launch
    browser = conftest.chromium()
    if not browser:
        pytest.skip("chromium is not installed and `apt-get install chromium` did not install it")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ui_study")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("orchestra.run_type") == "launch")
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == 2

    port = _free_port()
    log = tmp_path / "orchestra_ui.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        ui = subprocess.Popen(ORCHESTRA + ["ui", "--uri", uri, "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    servers: set[int] = set()
    try:
        def healthy() -> bool:
            servers.update(_children(ui.pid))
            assert ui.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        conftest.wait_for(healthy, 600, f"the MLflow server of `orchestra ui` on port {port}")
        servers.update(_children(ui.pid))
        found = re.search(r"runs of experiment 'ui_study': (\S+)", log.read_text())
        assert found, log.read_text()
        url = found.group(1)
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?")

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                 "--virtual-time-budget=20000", "--window-size=1600,1000"]
        names = [parent.info.run_name, *(k.info.run_name for k in kids)]
        metric_col = 'col-id="metrics.`train/loss`"'
        dom = ""

        def rendered() -> bool:
            nonlocal dom
            dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True,
                                 timeout=300).stdout
            return all(n in dom for n in names) and metric_col in dom

        try:
            conftest.wait_for(rendered, 600, "the runs table with the launch's runs")
        finally:
            (tmp_path / "runs_page.html").write_text(dom)
        assert "Model training" in dom  # the model-training view, not the GenAI overview
        assert re.search(r'role="columnheader"[^>]*' + re.escape(metric_col), dom), "no train/loss column header"
        assert dom.count(metric_col) >= 1 + len(kids)  # the header and one cell per trial run (at least)
        shot = tmp_path / "mlflow_runs_page.png"
        subprocess.run([browser, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=300)
        assert shot.exists() and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        if os.environ.get("ORCHESTRA_TEST_ARTIFACTS"):
            dest = Path(os.environ["ORCHESTRA_TEST_ARTIFACTS"])
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, dest / shot.name)
            print(f"screenshot copied to {dest / shot.name}")

        # SIGTERM to `orchestra ui` alone (not its group): it stops the server's own process group.
        assert servers, "no MLflow server process under `orchestra ui`"
        os.kill(ui.pid, signal.SIGTERM)
        ui.wait(120)
        assert ui.returncode == 0, log.read_text()
        conftest.wait_for(lambda: not _port_open(port), 60, f"port {port} to close")
        conftest.wait_for(lambda: not any(process_group_alive(p) for p in servers), 60, "the MLflow server processes to exit")
    finally:
        for pgid in [ui.pid, *servers]:
            if process_group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
        if ui.poll() is None:
            ui.wait(10)
