"""Reports: read an experiment's runs back from MLflow, aggregate seeds, plot, write HTML.

Data model
    ``load_experiment(uri, experiment)`` returns an :class:`ExperimentData` with two pyarrow tables:
    ``runs`` (one row per trial: run id, launch, status, seed, config label, final metrics) and
    ``history`` (long format: run id, metric key, step, value). ``--parquet DIR`` writes both.

Configurations
    Trials are grouped by their *config label*: the params that vary across the experiment's
    trials, excluding ``seed`` and orchestration-private keys (``_orchestra.*``).

Statistics (per config, over seeds)
    mean; 95% percentile-bootstrap CI: resample the n seed values with replacement B = 2000 times
    (seeded), take the 2.5% and 97.5% quantiles of the resampled means; IQM = mean of the middle 50%
    (25% trimmed mean, Agarwal et al. 2021, via rliable.metrics). With several envs/tasks: IQM,
    optimality gap and probability of improvement across tasks (rliable.metrics), and performance
    profiles P(score > τ) computed here.

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
    performance profiles with several envs: P(normalised score > τ) per config, scores min-max
    normalised per env over all runs of that env.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

PRIVATE_PREFIXES = ("_orchestra", "__trial_index__")


# ----------------------------------------------------------------------------------------------
# Statistics (pure functions)
# ----------------------------------------------------------------------------------------------
def bootstrap_ci(values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: quantiles (1∓level)/2 of B resampled means."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the 25%-trimmed mean (rliable's aggregate_iqm)."""
    from rliable import metrics

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(metrics.aggregate_iqm(v)) if v.size else math.nan


def performance_profile(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of runs (all tasks pooled) with score > τ, for each τ: P(X > τ)."""
    s = np.asarray(scores, dtype=float).ravel()
    s = s[np.isfinite(s)]
    return np.array([(s > t).mean() if s.size else math.nan for t in taus])


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
    return ", ".join(f"{k}={params.get(k, '')}" for k in varying) or "all"


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
def aggregate_final(data: ExperimentData, metric: str) -> list[dict[str, Any]]:
    """Per (env, config): n seeds used, mean, bootstrap CI, IQM of the final ``metric``; early stops counted."""
    runs = data.runs.to_pylist()
    col = f"final:{metric}"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["env"], r["config"]), []).append(r)
    out = []
    for (env, config), rs in sorted(groups.items()):
        used = [r for r in rs if not r["stopped_early"] and r["status"] == "FINISHED"]
        vals = np.array([r.get(col, math.nan) for r in used], dtype=float)
        vals = vals[np.isfinite(vals)]
        lo, hi = bootstrap_ci(vals)
        out.append({"env": env, "config": config, "n": int(vals.size), "mean": float(vals.mean()) if vals.size else math.nan,
                    "ci_low": lo, "ci_high": hi, "iqm": iqm(vals), "stopped_early": sum(r["stopped_early"] for r in rs),
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
    """Learning curves per (env, config): mean and bootstrap CI over seeds on a common step grid.

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
        ys = np.stack([np.interp(grid, s[:, 0], s[:, 1]) for s in series])
        cis = np.array([bootstrap_ci(ys[:, j]) for j in range(grid.size)])
        out[k] = {"step": grid, "mean": ys.mean(axis=0), "ci_low": cis[:, 0], "ci_high": cis[:, 1], "n": len(series)}
    return out


def across_tasks(data: ExperimentData, metric: str) -> dict[str, dict[str, float]] | None:
    """rliable aggregates across envs/tasks per config (only when there are several envs)."""
    from rliable import metrics as rm

    runs = data.runs.to_pylist()
    envs = sorted({r["env"] for r in runs})
    if len(envs) < 2:
        return None
    col = f"final:{metric}"
    configs = sorted({r["config"] for r in runs})
    out = {}
    for c in configs:
        per_env = [[r[col] for r in runs if r["config"] == c and r["env"] == e and not r["stopped_early"]] for e in envs]
        n = min(len(v) for v in per_env)
        if n == 0:
            continue
        scores = np.array([v[:n] for v in per_env], dtype=float).T  # [runs, tasks]
        out[c] = {"iqm": float(rm.aggregate_iqm(scores)), "mean": float(rm.aggregate_mean(scores)),
                  "median": float(rm.aggregate_median(scores)),
                  "optimality_gap": float(rm.aggregate_optimality_gap(scores, gamma=float(np.nanmax(scores))))}
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
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    drawn = False
    for ax, key in zip(axes.ravel(), keys):
        cs = curves(data, key)
        several = len({k[0] for k in cs}) > 1
        for (env, config), c in sorted(cs.items()):
            ax.plot(c["step"], c["mean"], label=f"{config}{f' [{env}]' if several else ''} (n={c['n']})")
            ax.fill_between(c["step"], c["ci_low"], c["ci_high"], alpha=0.2)
            drawn = True
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    if drawn:
        handles, labels = axes.ravel()[0].get_legend_handles_labels()
        legend_h = 0.22 * len(labels) + 0.2  # inches: one line per config, below the subplots
        fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + legend_h)
        fig.legend(handles, labels, loc="lower center", fontsize=7)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, legend_h / fig.get_size_inches()[1], 1, 1))
        fig.savefig(path, dpi=80)
    plt.close(fig)
    return drawn


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


def profile_scores(data: ExperimentData, metric: str) -> dict[str, np.ndarray]:
    """{config: final ``metric`` of every used run, min-max normalised per env over all runs of that env}."""
    runs = [r for r in data.runs.to_pylist() if not r["stopped_early"] and r["status"] == "FINISHED"]
    col = f"final:{metric}"
    by_env: dict[str, list[float]] = {}
    for r in runs:
        if math.isfinite(r.get(col, math.nan)):
            by_env.setdefault(r["env"], []).append(r[col])
    out: dict[str, list[float]] = {}
    for r in runs:
        v = r.get(col, math.nan)
        if not math.isfinite(v):
            continue
        lo, hi = min(by_env[r["env"]]), max(by_env[r["env"]])
        out.setdefault(r["config"], []).append((v - lo) / (hi - lo) if hi > lo else 1.0)
    return {c: np.array(v) for c, v in out.items()}


def _plot_profiles(data: ExperimentData, metric: str, path: Path) -> bool:
    if len({r["env"] for r in data.runs.to_pylist()}) < 2:
        return False
    scores = profile_scores(data, metric)
    if not scores:
        return False
    plt = _plt()
    taus = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, v in sorted(scores.items()):
        ax.step(taus, performance_profile(v if data.mode == "max" else 1 - v, taus), where="post", label=c)
    ax.set_xlabel("normalised score τ")
    ax.set_ylabel("fraction of runs with score > τ")
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
    write_html(out / "index.html", data, metric, rows, images, tasks)
    (out / "summary.json").write_text(json.dumps({"metric": metric, "configs": rows, "across_tasks": tasks},
                                                 indent=2, default=float))
    if attach:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        for p in data.parents:
            client.log_artifacts(p["run_id"], str(out), artifact_path="report")
    return out / "index.html"


def write_html(path: Path, data: ExperimentData, metric: str, rows: list[dict[str, Any]],
               images: list[tuple[str, str]], tasks: dict | None) -> None:
    e = html.escape
    base = data.uri if data.uri.startswith("http") else None
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(data.experiment)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}img{max-width:100%}</style></head><body>",
             f"<h1>{e(data.experiment)}</h1><p>metric: <b>{e(metric)}</b> ({e(data.mode)}); "
             f"{data.runs.num_rows} trials in {len(data.parents)} launch(es); MLflow: <code>{e(data.uri)}</code></p>",
             "<h2>Final metric per configuration</h2><table><tr><th>env</th><th>config</th><th>n</th><th>mean</th>"
             "<th>95% CI</th><th>IQM</th><th>notes</th><th>runs</th></tr>"]
    for r in rows:
        notes = ", ".join(f"{r[k]} {k.replace('_', ' ')}" for k in ("stopped_early", "failed", "killed") if r[k])
        links = " ".join(
            (f"<a href='{e(base)}/#/experiments/{e(data.experiment_id)}/runs/{rid}'>{rid[:8]}</a>" if base
             else f"<code>{rid[:8]}</code>")
            for rid in r["run_ids"])
        parts.append(f"<tr><td>{e(r['env'])}</td><td>{e(r['config'])}</td><td>{r['n']}</td><td>{r['mean']:.4g}</td>"
                     f"<td>[{r['ci_low']:.4g}, {r['ci_high']:.4g}]</td><td>{r['iqm']:.4g}</td><td>{e(notes)}</td>"
                     f"<td>{links}</td></tr>")
    parts.append("</table>")
    if tasks:
        parts.append("<h2>Across tasks (rliable)</h2><table><tr><th>config</th><th>IQM</th><th>mean</th>"
                     "<th>median</th><th>optimality gap</th></tr>")
        for c, v in tasks.items():
            parts.append(f"<tr><td>{e(c)}</td><td>{v['iqm']:.4g}</td><td>{v['mean']:.4g}</td><td>{v['median']:.4g}</td>"
                         f"<td>{v['optimality_gap']:.4g}</td></tr>")
        parts.append("</table>")
    for name, caption in images:
        parts.append(f"<figure><img src='{e(name)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>")
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>env</th><th>config</th><th>seed</th><th>status</th>"
                 f"<th>last iteration</th><th>final {e(metric)}</th><th>used in aggregates</th></tr>")
    for r in sorted(data.runs.to_pylist(), key=lambda r: (r["env"], r["config"], str(r["seed"]))):
        status = "stopped early" if r["stopped_early"] else r["status"]
        used = "no" if r["stopped_early"] or r["status"] != "FINISHED" else "yes"
        rid = r["run_id"]
        link = (f"<a href='{e(base)}/#/experiments/{e(data.experiment_id)}/runs/{rid}'>{rid[:8]}</a>" if base
                else f"<code>{rid[:8]}</code>")
        parts.append(f"<tr class='{'early' if r['stopped_early'] else ''}'><td>{link}</td><td>{e(r['env'])}</td>"
                     f"<td>{e(r['config'])}</td><td>{e(str(r['seed']))}</td><td>{e(status)}</td>"
                     f"<td>{r['last_iteration']}</td><td>{r.get('final:' + metric, math.nan):.4g}</td>"
                     f"<td>{used}</td></tr>")
    parts.append("</table></body></html>")
    path.write_text("\n".join(parts))


def write_parquet(data: ExperimentData, out_dir: str | Path) -> list[Path]:
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(data.runs, out / "runs.parquet")
    pq.write_table(data.history, out / "history.parquet")
    return [out / "runs.parquet", out / "history.parquet"]
