"""The report's statistics (orchestration/report.py, Agarwal et al. 2021 through rliable) against values
worked out by hand or in closed form; the across-task and improvement tables from a real runs table."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from orchestration import report as rep


def test_iqm_is_the_25_percent_trimmed_mean_of_all_runs_and_tasks():
    # 1..8: trim 2 from each end -> mean(3, 4, 5, 6) = 4.5; 1..12 as a [4, 3] matrix: trim 3 -> mean(4..9) = 6.5
    assert rep.iqm(np.arange(1, 9, dtype=float)) == pytest.approx(4.5)
    stats = rep.aggregate_intervals({"a": np.arange(1, 13, dtype=float).reshape(4, 3)})["a"]
    assert stats["iqm"].estimate == pytest.approx(6.5)


def test_aggregates_equal_their_closed_forms_and_intervals_hold_them():
    # N = 2 runs on M = 3 tasks; per-task means 1, 2, 20.
    x = np.array([[0.0, 1.0, 10.0], [2.0, 3.0, 30.0]])
    st = rep.aggregate_intervals({"x": x}, gamma=5.0)["x"]
    assert st["mean"].estimate == pytest.approx(23 / 3)
    assert st["median"].estimate == pytest.approx(2.0)
    # γ - mean(min(x, γ)) = 5 - (0 + 1 + 5 + 2 + 3 + 5) / 6
    assert st["optimality_gap"].estimate == pytest.approx(5 - 16 / 6)
    assert st["iqm"].estimate == pytest.approx(4.0)  # sorted 0 1 2 3 10 30, one cut at each end
    for name in rep.AGGREGATES:
        s = st[name]
        assert s.ci_low <= s.estimate <= s.ci_high, (name, s)
    # The mean's interval lies within the smallest and largest mean a resample can give: each task's mean
    # then lies between its smallest and largest run.
    assert (0 + 1 + 10) / 3 <= st["mean"].ci_low and st["mean"].ci_high <= (2 + 3 + 30) / 3


def test_intervals_collapse_on_constant_scores_and_one_run():
    # (bootstrap_ci's closed forms: tests/test_report.py)
    st = rep.aggregate_intervals({"c": np.full((5, 2), 0.25)})["c"]
    assert all((st[a].ci_low, st[a].ci_high) == pytest.approx((st[a].estimate,) * 2) for a in rep.AGGREGATES)
    low, high = rep.mean_intervals(np.array([[4.0, 5.0]]))  # one run
    assert low.tolist() == high.tolist() == [4.0, 5.0]
    none = rep.aggregate_intervals({"empty": np.zeros((0, 1))})["empty"]
    assert all(math.isnan(none[a].estimate) for a in rep.AGGREGATES)


def test_intervals_depend_on_the_seed_only_and_leave_numpys_global_rng_alone():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 3))
    first = rep.aggregate_intervals({"x": x}, seed=3)
    np.random.seed(123)
    expected_next = np.random.random_sample()
    np.random.seed(123)
    again = rep.aggregate_intervals({"x": x}, seed=3)
    assert np.random.random_sample() == expected_next  # the global state was put back
    assert again == first
    other = rep.aggregate_intervals({"x": x}, seed=4)
    assert other["x"]["iqm"].estimate == first["x"]["iqm"].estimate
    assert (other["x"]["iqm"].ci_low, other["x"]["iqm"].ci_high) != (first["x"]["iqm"].ci_low, first["x"]["iqm"].ci_high)
    assert rep.bootstrap_ci(x[:, 0], seed=5) == rep.bootstrap_ci(x[:, 0], seed=5)
    assert rep.probability_of_improvement(x, x + 0.3, reps=200, seed=1) == \
        rep.probability_of_improvement(x, x + 0.3, reps=200, seed=1)


def test_probability_of_improvement_closed_forms():
    # Few resamples: the estimates are exact whatever B, and an interval of identical inputs spans ½.
    def poi(x, y):
        return rep.probability_of_improvement(x, y, reps=200)

    low = np.array([[0.0, 1.0], [0.5, 1.5], [0.2, 1.2]])
    high = low + 10
    # Every seed of X beats every seed of Y on every task: 1, and every resample keeps it 1.
    p = poi(high, low)
    assert (p.estimate, p.ci_low, p.ci_high) == (1.0, 1.0, 1.0)
    q = poi(low, high)
    assert (q.estimate, q.ci_low, q.ci_high) == (0.0, 0.0, 0.0)
    same = poi(low, low)
    assert same.estimate == 0.5 and same.ci_low <= 0.5 <= same.ci_high
    # By hand, one task: pairs (1,2) (1,5) (3,2) (3,5) (4,2) (4,5) -> 2 wins of 6.
    assert poi(np.array([[1.0], [3.0], [4.0]]), np.array([[2.0], [5.0]])).estimate == pytest.approx(1 / 3)
    # Ties count 1/2: (1,2) (1,2) (2,2) (2,2) -> (0 + 0 + 1/2 + 1/2) / 4.
    assert poi(np.array([[1.0], [2.0]]), np.array([[2.0], [2.0]])).estimate == 0.25
    # Averaged over tasks: X wins task 0 outright and loses task 1 outright.
    mixed = poi(np.array([[5.0, 0.0], [6.0, 1.0]]), np.array([[1.0, 5.0], [2.0, 6.0]]))
    assert mixed.estimate == 0.5
    a, b = np.array([[0.3, 2.0], [0.9, 1.0], [0.1, 3.0]]), np.array([[0.5, 2.5], [0.2, 0.5]])
    assert poi(a, b).estimate + poi(b, a).estimate == pytest.approx(1.0)


def test_performance_profiles_are_score_distributions_with_intervals():
    prof = rep.performance_profile(np.array([0.1, 0.5, 0.9, 1.0]), np.array([0.0, 0.5, 0.95]))
    assert prof.tolist() == [1.0, 0.5, 0.25]
    taus = np.linspace(0, 1, 11)
    x = np.array([[0.05, 0.3], [0.55, 0.8], [0.95, 0.45]])
    (point, low, high), = rep.performance_profiles({"x": x}, taus, seed=2).values()
    assert point.tolist() == pytest.approx([np.mean(x > t) for t in taus])
    assert np.all(low <= point) and np.all(point <= high)
    assert np.all(np.diff(point) <= 0)  # P(score > τ) cannot grow with τ
    again, = rep.performance_profiles({"x": x}, taus, seed=2).values()
    assert all(np.array_equal(u, v) for u, v in zip(again, (point, low, high)))


def _data(rows: list[tuple[str, str, int, float]], mode: str = "max") -> rep.ExperimentData:
    """An ExperimentData as load_experiment builds it: (env, config, seed, final metric) per FINISHED run."""
    n = len(rows)
    runs = pa.table({"run_id": [f"run{i:04d}aaaa" for i in range(n)], "run_name": [f"r{i}" for i in range(n)],
                     "launch": ["L"] * n, "trial_id": [str(i) for i in range(n)], "status": ["FINISHED"] * n,
                     "seed": [str(r[2]) for r in rows], "workload": ["task"] * n, "env": [r[0] for r in rows],
                     "config": [r[1] for r in rows], "last_iteration": [4] * n, "stopped_early": [False] * n,
                     "final:score": pa.array([r[3] for r in rows], pa.float64())})
    hist = pa.table({"run_id": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                     "step": pa.array([], pa.int64()), "value": pa.array([], pa.float64()),
                     "timestamp": pa.array([], pa.int64())})
    return rep.ExperimentData("study", "sqlite:///unused.db", runs, hist, [{"run_id": "p", "launch": "L"}],
                              "score", mode, "3")


# Two envs on different scales; config b beats config a on both.
ROWS = [("A", "a", 0, 0.0), ("A", "a", 1, 2.0), ("A", "b", 0, 6.0), ("A", "b", 1, 10.0),
        ("B", "a", 0, 100.0), ("B", "a", 1, 300.0), ("B", "b", 0, 500.0), ("B", "b", 1, 300.0),
        ("B", "b", 2, 900.0)]


def test_task_scores_normalise_per_env_and_flip_for_min():
    envs, scores = rep.task_scores(_data(ROWS), "score")
    assert envs == ["A", "B"]
    # A spans 0..10, B 100..900. b has 2 seeds on A, 3 on B: it keeps seeds 0 and 1 on B.
    assert scores["a"].tolist() == [[0.0, 0.0], [0.2, 0.25]]
    assert scores["b"].tolist() == [[0.6, 0.5], [1.0, 0.25]]
    _, flipped = rep.task_scores(_data(ROWS, mode="min"), "score")
    assert flipped["a"].tolist() == [[1.0, 1.0], [0.8, 0.75]]


def test_across_task_table_and_improvements_from_a_runs_table():
    data = _data(ROWS)
    tasks = rep.across_tasks(data, "score")
    assert set(tasks) == {"a", "b"} and tasks["b"]["n"] == 2
    b = tasks["b"]
    assert b["mean"].estimate == pytest.approx(np.mean([0.6, 1.0, 0.5, 0.25]))
    assert b["median"].estimate == pytest.approx(np.median([0.8, 0.375]))
    assert b["optimality_gap"].estimate == pytest.approx(1 - np.mean([0.6, 1.0, 0.5, 0.25]))
    assert b["iqm"].ci_low <= b["iqm"].estimate <= b["iqm"].ci_high
    # One env only: no across-task table.
    assert rep.across_tasks(_data([r for r in ROWS if r[0] == "A"]), "score") is None

    (pair,) = rep.improvements(data, "score", reps=200)
    # Task A: b's {6, 10} beat a's {0, 2}: 1. Task B (seeds 0, 1): b's {500, 300} vs a's {100, 300}:
    # (1 + 1 + 1 + 1/2) / 4 = 7/8. Averaged: 15/16 that b beats a, so P(a > b) = 1/16.
    assert (pair["x"], pair["y"], pair["tasks"]) == ("a", "b", 2)
    assert pair["estimate"] == pytest.approx(1 / 16)
    assert pair["ci_low"] <= pair["estimate"] <= pair["ci_high"]
    assert rep.improvements(_data([r for r in ROWS if r[1] == "a"]), "score", reps=200) == []


def test_page_shows_intervals_and_escapes_names(tmp_path):
    data = _data([(env, f"{cfg}<i>", seed, v) for env, cfg, seed, v in ROWS])
    data.experiment = "<script>alert(1)</script>"
    rows = rep.aggregate_final(data, "score")
    tasks = rep.across_tasks(data, "score")
    pairs = rep.improvements(data, "score", reps=200)
    rep.write_html(tmp_path / "index.html", data, "score", rows, [], tasks, pairs)
    page = (tmp_path / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&lt;i&gt;" in page and "<i>" not in page
    iqm = tasks["b<i>"]["iqm"]
    assert f"<td>{iqm.estimate:.4g}</td><td>[{iqm.ci_low:.4g}, {iqm.ci_high:.4g}]</td>" in page
    assert "<h2>Probability of improvement</h2>" in page
    assert f"<td>{pairs[0]['estimate']:.4g}</td><td>[{pairs[0]['ci_low']:.4g}, {pairs[0]['ci_high']:.4g}]</td>" in page
    # A local store: run ids are shown, not linked.
    assert "<a href" not in page and "<code>run0000a</code>" in page
