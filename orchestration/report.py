"""Reports: read an experiment's runs back from MLflow, aggregate seeds, plot, write HTML.

Data model
    ``load_experiment(uri, experiment)`` returns an :class:`ExperimentData` with two pyarrow tables:
    ``runs`` (one row per trial: run id, launch, status, seed, config label, final metrics) and
    ``history`` (long format: run id, metric key, step, value). ``--parquet DIR`` writes both.

Configurations
    Trials are grouped by their *config label*: the params that vary across the experiment's
    trials, excluding ``seed`` and orchestration-private keys (``_orchestra.*``).

Statistics (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice", via rliable)
    Per (env, config), over the seeds that finished: mean and IQM (25% trimmed mean) of the final metric,
    each with a 95% percentile bootstrap interval (B = 2000 resamples of the seeds, seeded). With several
    envs: scores min-max normalised per env (1 = best run seen there), then per config IQM, mean, median
    and optimality gap (γ = 1) with stratified bootstrap intervals (seeds resampled within each env) and
    performance profiles P(score > τ) with pointwise intervals. With two or more configs: probability of
    improvement P(X > Y) with its interval. Formulas in the docstrings of the statistics functions below.

Early stopping
    A FINISHED trial whose last ``system/training_iteration`` is below the largest one in its launch was
    stopped early (e.g. by ASHA): it is shown as such (table of runs, dashed curves, notes) and left out
    of the final-metric aggregates and of the mean learning curves.

Panels (written when their keys exist; one PNG per panel, one subplot per key, a curve per config)
    plasticity: dormant_ratio, effective_rank, weight_norm, effective_lr (overall and per module);
    credit: td_error / advantage / value_error / action_influence means, bsuite score; a bar chart of
    the final TD and value error per delay bin (``credit/<name>_mean/delay_<bin>``);
    convergence: policy change, parameter change, feature drift, |ΔR|/‖Δθ‖, converged flag;
    bsuite score bars (final ``credit/bsuite_score/<experiment>``, ``exploration/bsuite_score``);
    DataRater score histograms: each run's newest ``*hist*.png`` artifact (copied into the report);
    performance profiles with several envs: P(normalised score > τ) per config, with 95% intervals.

Page
    ``index.html`` from the packaged Jinja2 template ``orchestration/templates/report.html.j2``
    (autoescaped); run ids link to their MLflow UI page when the store is a tracking server.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

PRIVATE_PREFIXES = ("_orchestra", "__trial_index__")


# ----------------------------------------------------------------------------------------------
# Statistics (pure functions)
#
# Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the Statistical Precipice"
# (NeurIPS), computed by its library rliable. A score matrix is [N, M]: N runs (seeds) of one
# configuration on M tasks (envs); x_{n,m} is the final metric of run n on task m.
# ----------------------------------------------------------------------------------------------
BOOTSTRAP_REPS = 2000
"""B, bootstrap resamples per interval."""
CI_LEVEL = 0.95
"""Coverage of every interval: the (1 - level)/2 and (1 + level)/2 quantiles of the B resampled values."""
AGGREGATES = ("iqm", "mean", "median", "optimality_gap")
"""The aggregate metrics of :func:`aggregate_intervals`, in the order the report shows them."""


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile stratified-bootstrap interval [ci_low, ci_high]."""

    estimate: float
    ci_low: float
    ci_high: float


@contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """rliable's StratifiedBootstrap draws its resampling indices from NumPy's global legacy RNG
    (``np.random.choice`` in ``rliable.library``), not from the ``random_state`` it accepts: seed that RNG
    for one estimate and put its previous state back afterwards, so an estimate depends on ``seed`` only."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _interval_estimates(scores: dict[Any, Any], func: Callable[..., np.ndarray], *, reps: int, level: float,
                        seed: int) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """{key: (func(scores[key]) [K], interval [2, K])} by rliable's ``get_interval_estimates`` (percentile
    method, runs resampled with replacement within each task)."""
    from rliable import library as rly

    with _seeded_global_rng(seed):
        points, intervals = rly.get_interval_estimates(scores, func, method="percentile", reps=reps,
                                                       confidence_interval_size=level)
    return {k: (np.atleast_1d(np.asarray(points[k], float)), np.asarray(intervals[k], float).reshape(2, -1))
            for k in scores}


def mean_intervals(values: np.ndarray, *, reps: int = BOOTSTRAP_REPS, level: float = CI_LEVEL,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over runs, column by column: values [N, K] -> (low [K], high [K]).

    x̄_k = (1/N) Σ_n x_{n,k}; each of B resamples draws N runs with replacement independently per column
    (rliable's stratified bootstrap with the columns as strata), and the interval is the (1 ∓ level)/2
    quantiles of the B resampled means. One run: the interval is that run's value.
    """
    v = np.asarray(values, dtype=float)
    if v.shape[0] == 1:
        return v[0].copy(), v[0].copy()
    (_, ci), = _interval_estimates({"x": v}, lambda s: np.mean(s, axis=0), reps=reps, level=level,
                                   seed=seed).values()
    return ci[0], ci[1]


def bootstrap_ci(values: np.ndarray, *, n_boot: int = BOOTSTRAP_REPS, level: float = CI_LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite ``values`` [N] (:func:`mean_intervals`)."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    low, high = mean_intervals(v[:, None], reps=n_boot, level=level, seed=seed)
    return float(low[0]), float(high[0])


def iqm(values: np.ndarray) -> float:
    """Interquartile mean of the finite ``values``: the mean of the middle 50%, the 25%-trimmed mean
    (Agarwal et al. 2021, sec. 4; ``rliable.metrics.aggregate_iqm``)."""
    from rliable import metrics

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(metrics.aggregate_iqm(v)) if v.size else math.nan


def aggregate_intervals(scores: dict[Any, np.ndarray], *, gamma: float = 1.0, reps: int = BOOTSTRAP_REPS,
                        level: float = CI_LEVEL, seed: int = 0) -> dict[Any, dict[str, Interval]]:
    """{key: {aggregate: Interval}} of each score matrix [N, M] (Agarwal et al. 2021, sec. 4; rliable.metrics):

        iqm             = mean of the middle 50% of the N·M scores (25% trimmed mean, ``aggregate_iqm``)
        mean            = (1/M) Σ_m x̄_m,  x̄_m = (1/N) Σ_n x_{n,m}            (``aggregate_mean``)
        median          = median_m x̄_m                                          (``aggregate_median``)
        optimality_gap  = γ - (1/(N·M)) Σ_{n,m} min(x_{n,m}, γ)                 (``aggregate_optimality_gap``)

    Intervals: stratified bootstrap (each resample draws N runs with replacement within every task), B
    resamples, percentile quantiles. Keys with no run get NaNs.
    """
    from rliable import metrics as rm

    def aggregates(s: np.ndarray) -> np.ndarray:
        return np.array([rm.aggregate_iqm(s), rm.aggregate_mean(s), rm.aggregate_median(s),
                         rm.aggregate_optimality_gap(s, gamma=gamma)])

    nan = Interval(math.nan, math.nan, math.nan)
    out: dict[Any, dict[str, Interval]] = {k: dict.fromkeys(AGGREGATES, nan) for k, v in scores.items() if not len(v)}
    full = {k: np.asarray(v, dtype=float) for k, v in scores.items() if len(v)}
    estimates = _interval_estimates(full, aggregates, reps=reps, level=level, seed=seed) if full else {}
    for k, (point, ci) in estimates.items():
        out[k] = {name: Interval(float(point[i]), float(ci[0, i]), float(ci[1, i])) for i, name in enumerate(AGGREGATES)}
    return {k: out[k] for k in scores}


def probability_of_improvement(x: np.ndarray, y: np.ndarray, *, reps: int = BOOTSTRAP_REPS, level: float = CI_LEVEL,
                               seed: int = 0) -> Interval:
    """P(X > Y) of configuration X (scores x [N, M]) over Y (scores y [K, M]), with its interval:

        P(X > Y) = (1/M) Σ_m (1/(N·K)) Σ_i Σ_j S(x_{i,m}, y_{j,m}),   S(a, b) = 1 if a > b, ½ if a = b, 0 if a < b

    the Mann-Whitney U statistic per task over N·K, averaged over tasks (Agarwal et al. 2021, sec. 4;
    ``rliable.metrics.probability_of_improvement``). P(Y > X) = 1 - P(X > Y). Interval: x and y resampled
    independently, runs within each task (rliable's StratifiedIndependentBootstrap), percentile quantiles.
    """
    from rliable import metrics as rm

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    (point, ci), = _interval_estimates({"x>y": [xs, ys]}, rm.probability_of_improvement, reps=reps, level=level,
                                       seed=seed).values()
    return Interval(float(point[0]), float(ci[0, 0]), float(ci[1, 0]))


def performance_profile(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Score distribution F̂(τ) = (1/(N·M)) Σ_{n,m} 1[x_{n,m} > τ] for each τ: the fraction of runs, all tasks
    pooled, that score above τ (Agarwal et al. 2021, sec. 4; ``rliable.library.score_distributions``)."""
    from rliable import library as rly

    s = np.asarray(scores, dtype=float).ravel()
    s = s[np.isfinite(s)]
    if not s.size:
        return np.full(len(taus), math.nan)
    return np.asarray(rly.score_distributions(s, np.asarray(taus, dtype=float)), dtype=float)


def performance_profiles(scores: dict[str, np.ndarray], taus: np.ndarray, *, reps: int = BOOTSTRAP_REPS,
                         level: float = CI_LEVEL, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{key: (F̂(τ), low(τ), high(τ))} for each score matrix [N, M] (:func:`performance_profile`), with pointwise
    stratified-bootstrap intervals (``rliable.library.create_performance_profile``, percentile method)."""
    from rliable import library as rly

    with _seeded_global_rng(seed):
        profiles, cis = rly.create_performance_profile({k: np.asarray(v, float) for k, v in scores.items()},
                                                       np.asarray(taus, dtype=float), reps=reps,
                                                       confidence_interval_size=level)
    return {k: (np.asarray(profiles[k], float), np.asarray(cis[k][0], float), np.asarray(cis[k][1], float))
            for k in scores}


# ----------------------------------------------------------------------------------------------
# Reading MLflow
# ----------------------------------------------------------------------------------------------
@dataclass
class ExperimentData:
    experiment: str
    uri: str
    runs: pa.Table
    history: pa.Table
    parents: list[dict[str, Any]]
    metric: str | None
    mode: str
    experiment_id: str = "0"


def _label(params: dict[str, str], varying: list[str]) -> str:
    """A configuration's name: ``key=value`` for each varying key the run set; a key the run left at its
    default (absent from its params) is omitted, and a run that set none of them is ``(defaults)``."""
    if not varying:
        return "all"
    return ", ".join(f"{k}={params[k]}" for k in varying if k in params) or "(defaults)"


def load_experiment(uri: str, experiment: str, *, launch: str | None = None,
                    metrics: list[str] | None = None) -> ExperimentData:
    """Child runs and metric histories of ``experiment`` (optionally one launch) as pyarrow tables."""
    from mlflow import MlflowClient

    from orchestration.spec import UserError
    from orchestration.tracking import require_experiment

    client = MlflowClient(uri)
    exp = require_experiment(client, experiment, uri)
    all_runs = client.search_runs([exp.experiment_id], max_results=50000)
    parents = [r for r in all_runs if r.data.tags.get("orchestra.run_type") == "launch"]
    if launch:
        launches = sorted({p.data.tags.get("orchestra.launch_id", "") for p in parents})
        parents = [p for p in parents if p.data.tags.get("orchestra.launch_id") == launch]
        if not parents:
            raise UserError(f"no launch {launch!r} in experiment {experiment!r}; launches: "
                            f"{', '.join(launches) or 'none'}")
    parent_ids = {p.info.run_id for p in parents}
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") in parent_ids]
    metric = next((p.data.tags.get("orchestra.metric") for p in parents if p.data.tags.get("orchestra.metric")), None)
    mode = next((p.data.tags.get("orchestra.mode") for p in parents if p.data.tags.get("orchestra.mode")), "max")

    def visible(k: str) -> bool:
        return not k.startswith(PRIVATE_PREFIXES) and k != "seed"

    keys = sorted({k for r in children for k in r.data.params if visible(k)})
    varying = [k for k in keys if len({r.data.params.get(k) for r in children}) > 1]
    rows: dict[str, list[Any]] = {c: [] for c in ("run_id", "run_name", "launch", "trial_id", "status", "seed",
                                                   "workload", "env", "config", "last_iteration", "stopped_early")}
    hist: dict[str, list[Any]] = {"run_id": [], "key": [], "step": [], "value": [], "timestamp": []}
    final: dict[str, dict[str, float]] = {}
    for r in children:
        rid = r.info.run_id
        keys_to_read = metrics if metrics is not None else list(r.data.metrics)
        for key in keys_to_read:
            for m in client.get_metric_history(rid, key):
                hist["run_id"].append(rid)
                hist["key"].append(key)
                hist["step"].append(int(m.step))
                hist["value"].append(float(m.value))
                hist["timestamp"].append(int(m.timestamp))
        final[rid] = {k: float(v) for k, v in r.data.metrics.items()}
    by_launch_max: dict[str, int] = {}
    iters = {}
    for r in children:
        it = r.data.metrics.get("system/training_iteration")
        if it is not None and float(it) < 1:
            # Logged before RLlib trials reported their iteration (the value was a constant 0): one point
            # per training iteration, so the number of points is the last iteration.
            it = len(client.get_metric_history(r.info.run_id, "system/training_iteration"))
        iters[r.info.run_id] = int(float(it)) if it is not None else None
    for r in children:
        lid = r.data.tags.get("orchestra.launch_id", "")
        it = iters[r.info.run_id]
        if it is not None:
            by_launch_max[lid] = max(by_launch_max.get(lid, 0), it)
    for r in children:
        t = r.data.tags
        it = iters[r.info.run_id]
        lid = t.get("orchestra.launch_id", "")
        early = bool(r.info.status == "FINISHED" and it is not None and it < by_launch_max.get(lid, 0))
        rows["run_id"].append(r.info.run_id)
        rows["run_name"].append(r.info.run_name or "")
        rows["launch"].append(lid)
        rows["trial_id"].append(t.get("orchestra.trial_id", ""))
        rows["status"].append(r.info.status)
        rows["seed"].append(t.get("orchestra.seed", r.data.params.get("seed", "")))
        rows["workload"].append(t.get("orchestra.algorithm", t.get("orchestra.task", "")))
        rows["env"].append(t.get("orchestra.env", t.get("orchestra.task", "")))
        rows["config"].append(_label(r.data.params, varying))
        rows["last_iteration"].append(it if it is not None else -1)
        rows["stopped_early"].append(early)
    table = pa.table(rows)
    metric_keys = sorted({k for f in final.values() for k in f})
    for k in metric_keys:
        table = table.append_column(f"final:{k}", pa.array([final[rid].get(k, math.nan) for rid in rows["run_id"]],
                                                            pa.float64()))
    parent_rows = [{"run_id": p.info.run_id, "launch": p.data.tags.get("orchestra.launch_id"), "status": p.info.status}
                   for p in parents]
    return ExperimentData(experiment, uri, table, pa.table(hist), parent_rows, metric, mode, exp.experiment_id)


def require_metric(data: ExperimentData, metric: str) -> None:
    """Raise :class:`~orchestration.spec.UserError` unless some trial run of ``data`` logged ``metric``
    (the message lists the metrics that were logged, close matches first)."""
    import difflib

    from orchestration.spec import UserError

    if data.runs.num_rows == 0:
        raise UserError(f"experiment {data.experiment!r} has no trial runs (launches: "
                        f"{', '.join(str(p['launch']) for p in data.parents) or 'none'})")
    logged = sorted(c[len("final:"):] for c in data.runs.column_names if c.startswith("final:"))
    if metric in logged:
        return
    close = difflib.get_close_matches(metric, logged, n=3, cutoff=0.5)
    shown = logged[:40]
    more = f" ... ({len(logged) - len(shown)} more)" if len(logged) > len(shown) else ""
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"metric {metric!r} was not logged by any run of {data.experiment!r}{hint}; "
                    f"logged metrics: {', '.join(shown) or 'none'}{more}")


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def _used(r: dict[str, Any], col: str) -> bool:
    """A run counts in the aggregates: FINISHED, not stopped early, and a finite final value of ``col``."""
    v = r.get(col, math.nan)
    return (r["status"] == "FINISHED" and not r["stopped_early"] and v is not None and math.isfinite(v))


def aggregate_final(data: ExperimentData, metric: str, *, seed: int = 0) -> list[dict[str, Any]]:
    """Per (env, config): n seeds used, mean and IQM of the final ``metric`` with their bootstrap intervals
    (:func:`aggregate_intervals` on the [n, 1] score matrix); early stops, failures and kills counted."""
    runs = data.runs.to_pylist()
    col = f"final:{metric}"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["env"], r["config"]), []).append(r)
    scores = {key: np.array([[r[col]] for r in rs if _used(r, col)], dtype=float).reshape(-1, 1)
              for key, rs in groups.items()}
    stats = aggregate_intervals(scores, seed=seed)
    out = []
    for (env, config), rs in sorted(groups.items()):
        st = stats[(env, config)]
        out.append({"env": env, "config": config, "n": int(scores[(env, config)].shape[0]),
                    "mean": st["mean"].estimate, "ci_low": st["mean"].ci_low, "ci_high": st["mean"].ci_high,
                    "iqm": st["iqm"].estimate, "iqm_ci_low": st["iqm"].ci_low, "iqm_ci_high": st["iqm"].ci_high,
                    "stopped_early": sum(r["stopped_early"] for r in rs),
                    "failed": sum(r["status"] == "FAILED" for r in rs), "killed": sum(r["status"] == "KILLED" for r in rs),
                    "run_ids": [r["run_id"] for r in rs]})
    return out


def run_histories(data: ExperimentData, metric: str) -> dict[str, np.ndarray]:
    """{run id: array [(step, value), ...] sorted by step} of ``metric``."""
    hist = data.history.to_pydict()
    by_run: dict[str, list[tuple[int, float]]] = {}
    for rid, key, step, value in zip(hist["run_id"], hist["key"], hist["step"], hist["value"]):
        if key == metric:
            by_run.setdefault(rid, []).append((step, value))
    return {rid: np.array(sorted(pts), dtype=float) for rid, pts in by_run.items()}


def curves(data: ExperimentData, metric: str, n_points: int = 50, *,
           include_stopped_early: bool = False) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Learning curves per (env, config): mean and pointwise bootstrap CI over seeds (:func:`mean_intervals`)
    on a common step grid.

    Each seed's history is linearly interpolated onto a grid from the largest first step to the
    smallest last step shared by the group's seeds (no extrapolation). Seeds stopped early are left
    out unless ``include_stopped_early`` (their shorter histories would cut everyone's grid).
    """
    hist = data.history.to_pydict()
    by_run: dict[str, list[tuple[int, float]]] = {}
    for rid, key, step, value in zip(hist["run_id"], hist["key"], hist["step"], hist["value"]):
        if key == metric:
            by_run.setdefault(rid, []).append((step, value))
    runs = [r for r in data.runs.to_pylist() if include_stopped_early or not r["stopped_early"]]
    groups: dict[tuple[str, str], list[np.ndarray]] = {}
    for r in runs:
        pts = sorted(by_run.get(r["run_id"], []))
        if len(pts) >= 1:
            groups.setdefault((r["env"], r["config"]), []).append(np.array(pts, dtype=float))
    out = {}
    for k, series in groups.items():
        lo_step = max(s[0, 0] for s in series)
        hi_step = min(s[-1, 0] for s in series)
        if hi_step < lo_step:
            continue
        grid = np.linspace(lo_step, hi_step, n_points) if hi_step > lo_step else np.array([lo_step])
        ys = np.stack([np.interp(grid, s[:, 0], s[:, 1]) for s in series])  # [seeds, steps]
        low, high = mean_intervals(ys)
        out[k] = {"step": grid, "mean": ys.mean(axis=0), "ci_low": low, "ci_high": high, "n": len(series)}
    return out


def _seed_order(seed: Any) -> tuple[int, float, str]:
    text = str(seed)
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def task_scores(data: ExperimentData, metric: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(envs, {config: score matrix [N, M]}) of the final ``metric`` of the used runs, for rliable.

    Scores are min-max normalised per env over the used runs of every config on that env, higher is better:
    s = (x - min) / (max - min) for mode max, s = (max - x) / (max - min) for mode min, s = 1 when all runs of
    the env score the same; so 1 is the best run seen on that env and 0 the worst. A config with no used run
    on some env is left out; with unequal seed counts across envs it keeps the N lowest seeds of each env,
    N its smallest count (rliable's matrices need N runs on every task).
    """
    col = f"final:{metric}"
    runs = [r for r in data.runs.to_pylist() if _used(r, col)]
    envs = sorted({r["env"] for r in data.runs.to_pylist()})
    by_env: dict[str, list[float]] = {}
    for r in runs:
        by_env.setdefault(r["env"], []).append(float(r[col]))

    def normalised(r: dict[str, Any]) -> float:
        lo, hi = min(by_env[r["env"]]), max(by_env[r["env"]])
        if hi <= lo:
            return 1.0
        return (hi - r[col]) / (hi - lo) if data.mode == "min" else (r[col] - lo) / (hi - lo)

    out = {}
    for config in sorted({r["config"] for r in runs}):
        per_env = [[normalised(r) for r in sorted((r for r in runs if r["config"] == config and r["env"] == e),
                                                  key=lambda r: _seed_order(r["seed"]))] for e in envs]
        n = min(len(v) for v in per_env)
        if n:
            out[config] = np.array([v[:n] for v in per_env], dtype=float).T
    return envs, out


def across_tasks(data: ExperimentData, metric: str, *, seed: int = 0) -> dict[str, dict[str, Any]] | None:
    """With several envs: {config: {"n": N, aggregate: Interval}} of :func:`aggregate_intervals` on the
    normalised score matrices of :func:`task_scores` (γ = 1, the best run seen on each env); None with one env."""
    envs, scores = task_scores(data, metric)
    if len(envs) < 2:
        return None
    stats = aggregate_intervals(scores, gamma=1.0, seed=seed)
    return {c: {"n": int(scores[c].shape[0]), **stats[c]} for c in scores}


PAIRWISE_MAX_CONFIGS = 5
"""Up to this many configs every pair is compared; beyond it each config against the best one by IQM."""


def improvements(data: ExperimentData, metric: str, *, reps: int = BOOTSTRAP_REPS,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Probability of improvement (:func:`probability_of_improvement`) between configurations, on the score
    matrices of :func:`task_scores` (the normalisation is monotone per env, so P(X > Y) is that of the raw
    final ``metric`` in the spec's direction). Every pair (X, Y) with X before Y in label order when there are
    at most :data:`PAIRWISE_MAX_CONFIGS` configs, else the best config by IQM as X against each other one.
    [] with fewer than two configs."""
    envs, scores = task_scores(data, metric)
    configs = sorted(scores)
    if len(configs) < 2:
        return []
    if len(configs) <= PAIRWISE_MAX_CONFIGS:
        pairs = [(x, y) for i, x in enumerate(configs) for y in configs[i + 1:]]
    else:
        best = max(configs, key=lambda c: iqm(scores[c]))
        pairs = [(best, y) for y in configs if y != best]
    out = []
    for x, y in pairs:
        p = probability_of_improvement(scores[x], scores[y], reps=reps, seed=seed)
        out.append({"x": x, "y": y, "n_x": int(scores[x].shape[0]), "n_y": int(scores[y].shape[0]),
                    "tasks": len(envs), "estimate": p.estimate, "ci_low": p.ci_low, "ci_high": p.ci_high})
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def summary_table(rows: list[dict[str, Any]], metric: str) -> str:
    head = f"{'env':<24} {'config':<40} {'n':>3} {metric + ' mean':>22} {'95% CI':>24} {'IQM':>10}  notes"
    lines = [head, "-" * len(head)]
    for r in rows:
        notes = []
        if r["stopped_early"]:
            notes.append(f"{r['stopped_early']} stopped early")
        if r["failed"]:
            notes.append(f"{r['failed']} failed")
        if r["killed"]:
            notes.append(f"{r['killed']} killed")
        ci = f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
        lines.append(f"{r['env'][:24]:<24} {r['config'][:40]:<40} {r['n']:>3} {r['mean']:>22.4g} {ci:>24} {r['iqm']:>10.4g}  "
                     + "; ".join(notes))
    return "\n".join(lines)


PANELS: dict[str, str] = {
    "plasticity": r"^plasticity/(?:[^/]+/)?(dormant_ratio|effective_rank|weight_norm|effective_lr)$",
    "credit": r"^credit/(td_error_mean|advantage_mean|value_error_mean|action_influence_mean|bsuite_score)$",
    "convergence": r"^convergence/(policy_change|parameter_change|feature_drift|"
                   r"return_change_per_parameter_change|converged)$",
    "exploration": r"^exploration/bsuite_score$",
}
"""Panel name -> regex of the metric keys it plots (see the module docstring)."""
MAX_PANEL_KEYS = 12


def panel_keys(keys: set[str] | list[str], panel: str) -> list[str]:
    """Keys of ``panel`` present in ``keys`` (overall keys first, then per module), at most 12."""
    pat = re.compile(PANELS[panel])
    found = sorted((k for k in keys if pat.match(k)), key=lambda k: (k.count("/"), k))
    return found[:MAX_PANEL_KEYS]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_panel(data: ExperimentData, keys: list[str], path: Path, title: str) -> bool:
    fig, drawn = panel_figure(data, keys, title)
    if drawn:
        fig.savefig(path, dpi=80)
    _plt().close(fig)
    return drawn


def panel_figure(data: ExperimentData, keys: list[str], title: str) -> tuple[Any, bool]:
    """A figure of one subplot per key (curves per configuration, :func:`curves`) and whether anything was
    drawn. Each (env, config) keeps one colour in every subplot and the legend lists every configuration
    drawn in any subplot."""
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    drawn = False
    per_key = {key: curves(data, key) for key in keys}
    # one colour per (env, config) across all subplots, so a configuration that lacks a key (e.g. a plain
    # network has no effective learning rate) does not shift the others' colours in that subplot
    groups = sorted({g for cs in per_key.values() for g in cs})
    several = len({env for env, _ in groups}) > 1
    colour = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    legend: dict[str, Any] = {}
    for ax, key in zip(axes.ravel(), keys):
        for (env, config), c in sorted(per_key[key].items()):
            label = f"{config}{f' [{env}]' if several else ''} (n={c['n']})"
            line, = ax.plot(c["step"], c["mean"], color=colour[(env, config)], label=label)
            ax.fill_between(c["step"], c["ci_low"], c["ci_high"], color=colour[(env, config)], alpha=0.2)
            legend.setdefault(label, line)
            drawn = True
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    if drawn:
        labels, handles = list(legend), list(legend.values())
        legend_h = 0.22 * len(labels) + 0.2  # inches: one line per config, below the subplots
        fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + legend_h)
        fig.legend(handles, labels, loc="lower center", fontsize=7)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, legend_h / fig.get_size_inches()[1], 1, 1))
    return fig, drawn


def final_means(data: ExperimentData, keys: list[str]) -> dict[str, dict[str, float]]:
    """{config label (with env when several): {key: mean of the final value over the used seeds}}."""
    runs = [r for r in data.runs.to_pylist() if not r["stopped_early"] and r["status"] == "FINISHED"]
    several = len({r["env"] for r in runs}) > 1
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        label = f"{r['config']} [{r['env']}]" if several else r["config"]
        for k in keys:
            v = r.get(f"final:{k}", math.nan)
            if v is not None and math.isfinite(v):
                out.setdefault(label, {}).setdefault(k, []).append(v)  # type: ignore[arg-type]
    return {c: {k: float(np.mean(v)) for k, v in d.items()} for c, d in out.items()}


def _plot_bars(groups: dict[str, dict[str, float]], keys: list[str], labels: list[str], path: Path, title: str,
               ylabel: str) -> bool:
    if not groups or not keys:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) * max(1, len(groups)) / 2), 4))
    width = 0.8 / len(groups)
    x = np.arange(len(keys))
    for i, (config, vals) in enumerate(sorted(groups.items())):
        ax.bar(x + i * width, [vals.get(k, math.nan) for k in keys], width, label=config)
    ax.set_xticks(x + width * (len(groups) - 1) / 2)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _delay_order(label: str) -> tuple[int, int]:
    head = label.split("_")[0]
    return (1, 0) if head == "none" else (0, int(head)) if head.isdigit() else (2, 0)


def _plot_credit_delays(data: ExperimentData, final_keys: set[str], path: Path) -> bool:
    keys = [k for k in final_keys if re.match(r"^credit/(td_error|value_error)_mean/delay_", k)]
    if not keys:
        return False
    keys.sort(key=lambda k: (k.split("/")[1], _delay_order(k.split("/delay_")[1])))
    labels = [f"{k.split('/')[1].replace('_mean', '')} d={k.split('/delay_')[1]}" for k in keys]
    return _plot_bars(final_means(data, keys), keys, labels, path,
                      "Final TD error and value error by delay to the next reward", "mean")


def _plot_bsuite(data: ExperimentData, final_keys: set[str], path: Path) -> bool:
    keys = sorted(k for k in final_keys if k.startswith("credit/bsuite_score/") or k == "exploration/bsuite_score")
    if not keys:
        return False
    return _plot_bars(final_means(data, keys), keys, [k.split("/")[-1] if "/" in k[7:] else k for k in keys],
                      path, "bsuite scores (final)", "score")


PROFILE_TAUS = np.linspace(0, 1, 101)
"""Thresholds τ of the performance profiles (normalised scores lie in [0, 1])."""


def _plot_profiles(data: ExperimentData, metric: str, path: Path, *, seed: int = 0) -> bool:
    envs, scores = task_scores(data, metric)
    if len(envs) < 2 or not scores:
        return False
    plt = _plt()
    from rliable import plot_utils

    profiles = performance_profiles(scores, PROFILE_TAUS, seed=seed)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_utils.plot_performance_profiles({c: v[0] for c, v in profiles.items()}, PROFILE_TAUS,
                                         performance_profile_cis={c: (v[1], v[2]) for c, v in profiles.items()},
                                         ax=ax, xlabel="normalised score τ", ylabel="fraction of runs with score > τ",
                                         labelsize="small", ticklabelsize="small")
    ax.set_title(f"Performance profile: {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _copy_histograms(data: ExperimentData, out: Path) -> list[tuple[str, str]]:
    """Each run's newest ``*hist*.png`` artifact, downloaded into ``out`` (DataRater score histograms)."""
    from mlflow import MlflowClient

    client = MlflowClient(data.uri)
    images = []
    for r in data.runs.to_pylist():
        try:
            names = [a.path for a in client.list_artifacts(r["run_id"]) if not a.is_dir]
        except Exception:  # noqa: BLE001 - an artifact store we cannot list: no histograms for this run
            continue
        hists = sorted(n for n in names if "hist" in n.rsplit("/", 1)[-1] and n.endswith(".png"))
        if not hists:
            continue
        local = Path(client.download_artifacts(r["run_id"], hists[-1], str(out / "_dl")))
        name = f"hist_{r['run_id'][:8]}.png"
        (out / name).write_bytes(local.read_bytes())
        images.append((name, f"DataRater score histogram: {r['config']} seed {r['seed']} ({hists[-1]})"))
    return images


def _plot_curves(data: ExperimentData, metric: str, path: Path, title: str | None = None) -> bool:
    plt = _plt()

    cs = curves(data, metric)
    early = [r for r in data.runs.to_pylist() if r["stopped_early"]]
    hists = run_histories(data, metric) if early else {}
    if not cs and not any(r["run_id"] in hists for r in early):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for (env, config), c in sorted(cs.items()):
        label = f"{config} ({env}, n={c['n']})" if len({k[0] for k in cs}) > 1 else f"{config} (n={c['n']})"
        ax.plot(c["step"], c["mean"], label=label)
        ax.fill_between(c["step"], c["ci_low"], c["ci_high"], alpha=0.2)
    for i, r in enumerate(early):
        h = hists.get(r["run_id"])
        if h is not None and len(h):
            ax.plot(h[:, 0], h[:, 1], "--", color="grey", linewidth=0.8,
                    label="stopped early (single seeds)" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(uri: str, experiment: str, out_dir: str | Path, *, metric: str | None = None,
                 launch: str | None = None, attach: bool = True) -> Path:
    """Plots + table + ``index.html`` under ``out_dir``; attached to each parent run as artifacts."""
    data = load_experiment(uri, experiment, launch=launch)
    metric = metric or data.metric or "env/episode_return_mean"
    require_metric(data, metric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate_final(data, metric)
    images = []
    if _plot_curves(data, metric, out / "learning_curve.png", f"{experiment}: {metric}"):
        images.append(("learning_curve.png", f"Learning curve: {metric} (mean, 95% bootstrap CI over seeds)"))
    present = set(data.history.column("key").to_pylist()) if data.history.num_rows else set()
    for panel in PANELS:
        keys = [k for k in panel_keys(present, panel) if k != metric]
        if keys and _plot_panel(data, keys, out / f"panel_{panel}.png", f"{panel} (mean, 95% CI over seeds)"):
            images.append((f"panel_{panel}.png", f"{panel}: {', '.join(keys)}"))
    final_keys = {c[len("final:"):] for c in data.runs.column_names if c.startswith("final:")}
    if _plot_credit_delays(data, final_keys, out / "credit_delays.png"):
        images.append(("credit_delays.png", "credit: final TD error and value error per delay bin (mean over seeds)"))
    if _plot_bsuite(data, final_keys, out / "bsuite_scores.png"):
        images.append(("bsuite_scores.png", "bsuite scores (final, mean over seeds)"))
    if _plot_profiles(data, metric, out / "performance_profile.png"):
        images.append(("performance_profile.png", f"Performance profile of the final {metric} across envs"))
    images += _copy_histograms(data, out)
    tasks = across_tasks(data, metric)
    pairs = improvements(data, metric)
    write_html(out / "index.html", data, metric, rows, images, tasks, pairs)
    json_tasks = {c: {k: asdict(v) if isinstance(v, Interval) else v for k, v in st.items()}
                  for c, st in tasks.items()} if tasks else None
    (out / "summary.json").write_text(json.dumps({"metric": metric, "configs": rows, "across_tasks": json_tasks,
                                                  "probability_of_improvement": pairs}, indent=2, default=float))
    if attach:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        for p in data.parents:
            client.log_artifacts(p["run_id"], str(out), artifact_path="report")
    return out / "index.html"


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run (``<server>/#/experiments/<experiment id>/runs/<run id>``), or None when
    ``uri`` is a local store rather than a tracking server."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _num(value: Any) -> str:
    """Four significant digits (the report's number format); '–' for a missing value."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def render_html(data: ExperimentData, metric: str, rows: list[dict[str, Any]], images: list[tuple[str, str]],
                tasks: dict[str, dict[str, Any]] | None, pairs: list[dict[str, Any]]) -> str:
    """The report page from the packaged template ``orchestration/templates/report.html.j2`` (autoescaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("orchestration", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = _num

    def link(rid: str) -> dict[str, str | None]:
        return {"href": run_url(data.uri, data.experiment_id, rid), "label": rid[:8]}

    config_rows = [{**r, "links": [link(rid) for rid in r["run_ids"]],
                    "notes": ", ".join(f"{r[k]} {k.replace('_', ' ')}" for k in ("stopped_early", "failed", "killed")
                                       if r[k])} for r in rows]
    runs = []
    for r in sorted(data.runs.to_pylist(), key=lambda r: (r["env"], r["config"], _seed_order(r["seed"]))):
        runs.append({**link(r["run_id"]), "env": r["env"], "config": r["config"], "seed": str(r["seed"]),
                     "status": "stopped early" if r["stopped_early"] else r["status"],
                     "early": r["stopped_early"], "last_iteration": r["last_iteration"],
                     "final": r.get("final:" + metric, math.nan),
                     "used": "yes" if _used(r, f"final:{metric}") else "no"})
    return env.get_template("report.html.j2").render(
        experiment=data.experiment, metric=metric, mode=data.mode, uri=data.uri, n_trials=data.runs.num_rows,
        n_launches=len(data.parents), level=round(CI_LEVEL * 100), reps=BOOTSTRAP_REPS, rows=config_rows,
        tasks=tasks, aggregates=AGGREGATES, pairs=pairs, images=images, runs=runs)


def write_html(path: Path, data: ExperimentData, metric: str, rows: list[dict[str, Any]],
               images: list[tuple[str, str]], tasks: dict[str, dict[str, Any]] | None,
               pairs: list[dict[str, Any]] | None = None) -> None:
    """Write :func:`render_html` to ``path``."""
    path.write_text(render_html(data, metric, rows, images, tasks, pairs or []), encoding="utf-8")


def write_parquet(data: ExperimentData, out_dir: str | Path) -> list[Path]:
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(data.runs, out / "runs.parquet")
    pq.write_table(data.history, out / "history.parquet")
    return [out / "runs.parquet", out / "history.parquet"]
