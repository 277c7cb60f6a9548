"""Reports: numbers equal an independent recomputation from MLflow; the HTML renders in Chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

import conftest
import numpy as np
import pytest
from mlflow import MlflowClient

from orchestration import report as rep
from orchestration.runner import run


def test_bootstrap_ci_and_iqm_closed_forms():
    # One value: the CI collapses onto it. Constant values: CI is that constant.
    assert rep.bootstrap_ci(np.array([3.0])) == (3.0, 3.0)
    assert rep.bootstrap_ci(np.array([2.0, 2.0, 2.0])) == (2.0, 2.0)
    # Two values a < b: every resampled mean is a, (a+b)/2 or b; the 95% interval spans [a, b].
    lo, hi = rep.bootstrap_ci(np.array([0.0, 1.0]))
    assert lo == 0.0 and hi == 1.0
    # IQM of 1..8: trim 2 from each end -> mean(3, 4, 5, 6) = 4.5
    assert rep.iqm(np.arange(1, 9, dtype=float)) == pytest.approx(4.5)
    prof = rep.performance_profile(np.array([0.1, 0.5, 0.9, 1.0]), np.array([0.0, 0.5, 0.95]))
    assert prof.tolist() == [1.0, 0.5, 0.25]


@pytest.fixture(scope="module")
def launch(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = run({"name": "report_study", "task": "regression_demo", "config": {"lr": {"grid": [0.02, 0.1]}},
               "seeds": [0, 1, 2], "stop": {"training_iteration": 4}, "metric": "train/loss", "mode": "min",
               "tracking": {"uri": uri, "storage": str(tmp / "runs"), "artifacts": str(tmp / "art")}})
    assert out.num_errors == 0
    return uri, tmp


def test_report_numbers_equal_independent_recomputation(launch):
    uri, tmp = launch
    data = rep.load_experiment(uri, "report_study")
    rows = {r["config"]: r for r in rep.aggregate_final(data, "train/loss")}
    assert set(rows) == {"lr=0.02", "lr=0.1"}

    # Independent: straight from MLflow, last point of each child's history, grouped by the lr param.
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("report_study")
    finals: dict[str, list[float]] = {}
    for r in client.search_runs([exp.experiment_id]):
        if "mlflow.parentRunId" not in r.data.tags:
            continue
        hist = sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)
        assert [m.step for m in hist] == [20, 40, 60, 80]
        finals.setdefault(r.data.params["lr"], []).append(hist[-1].value)
    for lr, values in finals.items():
        row = rows[f"lr={lr}"]
        assert row["n"] == 3
        assert row["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
        assert min(values) <= row["ci_low"] and row["ci_high"] <= max(values)

    curve = rep.curves(data, "train/loss")[("regression_demo", "lr=0.1")]
    assert curve["n"] == 3 and curve["step"][0] == 20 and curve["step"][-1] == 80


def test_parquet_export_roundtrip(launch, tmp_path: Path):
    import pyarrow.parquet as pq

    uri, _ = launch
    data = rep.load_experiment(uri, "report_study")
    runs_path, hist_path = rep.write_parquet(data, tmp_path)
    assert pq.read_table(runs_path).num_rows == 6
    hist = pq.read_table(hist_path).to_pydict()
    assert sum(k == "train/loss" for k in hist["key"]) == 6 * 4


def _last_iteration_cells(page: str) -> list[str]:
    """The "last iteration" cells of the report's runs table."""
    import re

    table = page.split("<h2>Runs</h2>", 1)[1]
    heads = re.findall(r"<th>(.*?)</th>", table.split("</tr>", 1)[0])
    col = heads.index("last iteration")
    rows = re.findall(r"<tr class='[^']*'>(.*?)</tr>", table, re.S)
    return [re.findall(r"<td>(.*?)</td>", re.sub(r"<td><(?:a|code)[^>]*>.*?</(?:a|code)></td>", "<td>link</td>", r))[col]
            for r in rows]


def test_html_runs_table_shows_the_last_iteration(launch, tmp_path: Path):
    uri, _ = launch
    data = rep.load_experiment(uri, "report_study")
    assert data.runs.column("last_iteration").to_pylist() == [4] * 6  # stop: training_iteration 4
    page = rep.write_report(uri, "report_study", tmp_path / "report", attach=False).read_text()
    assert _last_iteration_cells(page) == ["4"] * 6


def test_last_iteration_of_runs_that_logged_a_constant_zero(tmp_path: Path):
    # RLlib launches before the fix logged system/training_iteration = 0 every iteration: the report
    # counts the points instead (one per iteration) rather than showing 0.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("old_rllib")
    parent = client.create_run(exp, run_name="old-1", tags={"orchestra.run_type": "launch",
                                                            "orchestra.launch_id": "old-1"})
    kid = client.create_run(exp, run_name="trial", tags={"mlflow.parentRunId": parent.info.run_id,
                                                         "orchestra.launch_id": "old-1"})
    for i in range(5):
        client.log_metric(kid.info.run_id, "system/training_iteration", 0.0, step=1000 * (i + 1))
        client.log_metric(kid.info.run_id, "env/episode_return_mean", float(i), step=1000 * (i + 1))
    client.set_terminated(kid.info.run_id, "FINISHED")
    data = rep.load_experiment(uri, "old_rllib")
    assert data.runs.column("last_iteration").to_pylist() == [5]
    page = rep.write_report(uri, "old_rllib", tmp_path / "report", attach=False).read_text()
    assert _last_iteration_cells(page) == ["5"]


def test_html_report_renders_every_image_in_chromium(launch, tmp_path: Path):
    uri, _ = launch
    index = rep.write_report(uri, "report_study", tmp_path / "report")
    client = MlflowClient(uri)
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("report_study").experiment_id])
                  if r.data.tags.get("orchestra.run_type") == "launch")
    assert "report/index.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    browser = conftest.chromium()
    assert browser, "chromium could not be installed (apt-get install chromium)"
    # Count images that decoded (naturalWidth > 0) through a script the page runs, dumped via --dump-dom.
    probe = tmp_path / "report" / "probe.html"
    page = index.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.title='images:'+i.length+':loaded:'+i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script></body>")
    probe.write_text(page)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    # Virtual time (--virtual-time-budget), not wall time, bounds the page; the subprocess deadline is
    # only there against a hung browser, generous for a loaded machine.
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=600)
    assert "<title>" in dom.stdout, dom.stderr[-3000:]
    title = dom.stdout.split("<title>")[1].split("</title>")[0]
    _, n, _, loaded = title.split(":")
    assert int(n) >= 1 and int(loaded) == int(n), title
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", index.as_uri()],
                   capture_output=True, timeout=600)
    assert shot.exists() and shot.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------
# Seeds stopped early by ASHA; plasticity panels


@pytest.fixture(scope="module")
def asha_launch(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("asha")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # One trial at a time in grid order (lr=0.1 first for each seed): lr = 1e-4 learns far slower and
    # is cut at the first rung (iteration 1 of max 4) against the lr = 0.1 results recorded there.
    out = run({"name": "asha_study", "task": "regression_demo", "config": {"lr": {"grid": [0.1, 1e-4]}},
               "seeds": [0, 1], "stop": {"training_iteration": 4}, "metric": "train/loss", "mode": "min",
               "scheduler": {"type": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
               "max_concurrent_trials": 1, "diagnostics": {"plasticity": {"every": 2, "probe_size": 16}},
               "tracking": {"uri": uri, "storage": str(tmp / "runs"), "artifacts": str(tmp / "art")}})
    assert out.num_errors == 0
    return uri


def test_asha_stopped_seeds_are_flagged_not_averaged(asha_launch, tmp_path: Path):
    uri = asha_launch
    data = rep.load_experiment(uri, "asha_study")
    runs = data.runs.to_pylist()
    # Independent: number of training iterations each child run logged, straight from MLflow.
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("asha_study")
    iters, finals = {}, {}
    for r in client.search_runs([exp.experiment_id]):
        if "mlflow.parentRunId" in r.data.tags:
            hist = sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)
            iters[r.info.run_id] = len(hist)
            finals[r.info.run_id] = (r.data.params["lr"], hist[-1].value)
    stopped = {rid for rid, n in iters.items() if n < 4}
    assert stopped, f"ASHA stopped no trial: {iters}"
    assert {r["run_id"] for r in runs if r["stopped_early"]} == stopped
    rows = {r["config"]: r for r in rep.aggregate_final(data, "train/loss")}
    for lr, row in ((lr, rows[f"lr={lr}"]) for lr in {v[0] for v in finals.values()}):
        used = [v for rid, (lr2, v) in finals.items() if lr2 == lr and rid not in stopped]
        assert row["n"] == len(used)
        assert row["stopped_early"] == sum(1 for rid in stopped if finals[rid][0] == lr)
        if used:
            assert row["mean"] == pytest.approx(float(np.mean(used)), rel=1e-12)
        else:
            assert np.isnan(row["mean"])
    table = rep.summary_table(rep.aggregate_final(data, "train/loss"), "train/loss")
    assert "stopped early" in table
    # The report shows them: run table rows, curves without them, and the plasticity panel.
    index = rep.write_report(uri, "asha_study", tmp_path / "report", attach=False)
    page = index.read_text()
    for rid in stopped:
        assert rid[:8] in page
    assert page.count("<td>stopped early</td>") == len(stopped)
    assert (tmp_path / "report" / "panel_plasticity.png").stat().st_size > 5000
    for c in rep.curves(data, "train/loss").values():
        assert c["step"][-1] == 80  # mean curves run to the last iteration (4 x 20 steps): no early seed cuts them


@pytest.mark.slow
def test_report_credit_and_convergence_panels_from_a_ppo_launch(ray_local, tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run({"name": "diag_study", "algorithm": "PPO", "env": "CartPole-v1",
               "config": {"train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 1,
                          "num_env_runners": 0},
               "seeds": [0], "stop": {"training_iteration": 3},
               "diagnostics": {"credit": {"every": 1, "episodes": 1, "max_episode_steps": 30},
                               "convergence": {"every": 1, "probe_size": 16, "window": 2}},
               "tracking": {"uri": uri, "storage": str(tmp_path / "runs"), "artifacts": str(tmp_path / "art")}})
    assert out.num_errors == 0
    data = rep.load_experiment(uri, "diag_study")
    keys = set(data.history.column("key").to_pylist())
    assert {"credit/td_error_mean", "credit/td_error_mean/delay_0", "convergence/policy_kl",
            "convergence/converged"} <= keys
    # RLlib results carry no training_iteration when step() returns: the trainable reports the real one.
    assert data.runs.column("last_iteration").to_pylist() == [3]
    assert [m.value for m in sorted(MlflowClient(uri).get_metric_history(
        data.runs.column("run_id")[0].as_py(), "system/training_iteration"), key=lambda m: m.step)] == [1, 2, 3]
    index = rep.write_report(uri, "diag_study", tmp_path / "report", attach=False)
    page = index.read_text()
    assert _last_iteration_cells(page) == ["3"]
    for name in ("panel_credit.png", "panel_convergence.png", "credit_delays.png"):
        assert name in page and (tmp_path / "report" / name).stat().st_size > 5000


# ---------------------------------------------------------------------------------------------------
# Run links open the run's page on a real MLflow server


def test_run_link_opens_the_runs_page_on_the_mlflow_server(mlflow_server, tmp_path: Path):
    import re
    import urllib.parse

    client = MlflowClient(mlflow_server.uri)
    client.create_experiment("decoy")  # the report's experiment is neither the default (0) nor the first
    exp_id = client.create_experiment("linked_study")
    parent = client.create_run(exp_id, run_name="linked-1", tags={"orchestra.run_type": "launch",
                                                                  "orchestra.launch_id": "linked-1",
                                                                  "orchestra.metric": "train/loss",
                                                                  "orchestra.mode": "min"})
    kids = {}
    for seed in (0, 1):
        kid = client.create_run(exp_id, run_name=f"linked-trial-seed{seed}",
                                tags={"mlflow.parentRunId": parent.info.run_id, "orchestra.launch_id": "linked-1",
                                      "orchestra.seed": str(seed)})
        for i in range(3):
            client.log_metric(kid.info.run_id, "train/loss", 1.0 / (i + 1 + seed), step=i + 1)
            client.log_metric(kid.info.run_id, "system/training_iteration", float(i + 1), step=i + 1)
        client.set_terminated(kid.info.run_id, "FINISHED")
        kids[kid.info.run_id] = kid.info.run_name
    assert exp_id != "0"

    page = rep.write_report(mlflow_server.uri, "linked_study", tmp_path / "report", attach=False).read_text()
    runs_table = page.split("<h2>Runs</h2>", 1)[1]
    hrefs = re.findall(r"<a href='([^']+)'>", runs_table)
    assert len(hrefs) == len(kids)
    for href in hrefs:
        found = re.fullmatch(re.escape(mlflow_server.uri) + r"/#/experiments/([^/]+)/runs/([0-9a-f]+)", href)
        assert found, href
        link_exp, run_id = found.groups()
        assert run_id in kids
        assert link_exp == client.get_run(run_id).info.experiment_id == exp_id

    browser = conftest.chromium()
    assert browser, "chromium could not be installed (apt-get install chromium)"
    href = hrefs[0]
    run_id = urllib.parse.urlsplit(href).fragment.rsplit("/", 1)[1]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=20000", "--window-size=1400,900"]
    dom = ""

    def rendered() -> bool:
        # MLflow's UI is a single-page app: the run's page exists only once its script has rendered it.
        nonlocal dom
        dom = subprocess.run([browser, *flags, "--dump-dom", href], capture_output=True, text=True,
                             timeout=300).stdout
        return kids[run_id] in dom

    try:
        conftest.wait_for(rendered, 600, f"the MLflow page of run {run_id} with its name")
    finally:
        (tmp_path / "run_page.html").write_text(dom)
    assert run_id in dom
    assert all(name not in dom for rid, name in kids.items() if rid != run_id)  # that run's page, not a list


def test_panel_colours_follow_the_configuration_across_subplots(tmp_path: Path):
    # A plain network logs no effective learning rate: in that subplot the other configurations must keep
    # their colours (they used to take the next colour of the cycle, so a line read as the wrong method).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("panel")
    parent = client.create_run(exp, run_name="l-1", tags={"orchestra.run_type": "launch",
                                                          "orchestra.launch_id": "l-1"})
    configs = {"plain": {}, "ln": {"network.norm": "layer"}, "nap": {"network.norm": "layer", "network.nap": "True"}}
    for name, params in configs.items():
        for seed in (0, 1):
            kid = client.create_run(exp, run_name=f"{name}-{seed}", tags={
                "mlflow.parentRunId": parent.info.run_id, "orchestra.launch_id": "l-1", "orchestra.seed": str(seed)})
            for k, v in params.items():
                client.log_param(kid.info.run_id, k, v)
            for i in range(3):
                client.log_metric(kid.info.run_id, "plasticity/weight_norm", 10.0 + i, step=100 * (i + 1))
                if name != "plain":
                    client.log_metric(kid.info.run_id, "plasticity/effective_lr", 1e-4, step=100 * (i + 1))
            client.set_terminated(kid.info.run_id, "FINISHED")
    data = rep.load_experiment(uri, "panel")
    assert sorted(set(data.runs.column("config").to_pylist())) == [
        "(defaults)", "network.nap=True, network.norm=layer", "network.norm=layer"]
    fig, drawn = rep.panel_figure(data, ["plasticity/effective_lr", "plasticity/weight_norm"], "plasticity")
    assert drawn
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes[:2]]
    assert len(colours[0]) == 2 and len(colours[1]) == 3
    for label, c in colours[0].items():
        assert colours[1][label] == c
    assert len(set(colours[1].values())) == 3
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == sorted(colours[1])
