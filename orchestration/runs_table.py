"""``orchestra ls``: a text table of experiments and their runs in an MLflow store."""

from __future__ import annotations

import math
import time

from orchestration.tracking.store import mlflow_client, require_experiment


def list_runs_table(tracking_uri: str, experiment: str | None = None) -> str:
    """A text table of experiments and their runs (``orchestra ls``): launches, then their trials
    indented, with status and the best value of the launch's metric (tags ``orchestra.metric`` and
    ``orchestra.mode`` on the parent; best = max or min over the trial's whole history)."""
    from mlflow.entities import ViewType

    client = mlflow_client(tracking_uri)
    if experiment is not None:
        experiments = [require_experiment(client, experiment, tracking_uri)]
    else:
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    rows = [("EXPERIMENT", "RUN", "RUN ID", "STATUS", "STARTED", "BEST")]
    for exp in sorted(experiments, key=lambda e: e.name):
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"],
                                  max_results=10000)
        parents = [r for r in runs if r.data.tags.get("orchestra.run_type") == "launch"]
        children: dict[str, list] = {}
        others = []
        for r in runs:
            pid = r.data.tags.get("mlflow.parentRunId")
            if r.data.tags.get("orchestra.run_type") == "launch":
                continue
            if pid:
                children.setdefault(pid, []).append(r)
            else:
                others.append(r)
        if not runs:
            rows.append((exp.name, "-", "-", "-", "-", "-"))
        for p in parents + others:
            metric = p.data.tags.get("orchestra.metric")
            mode = p.data.tags.get("orchestra.mode", "max")
            kids = children.get(p.info.run_id, [])
            bests = [(_best(client, k, metric, mode) if metric else None) for k in kids]
            found = [b for b in bests if b is not None]
            best = (max(found) if mode == "max" else min(found)) if found else None
            rows.append((exp.name, p.info.run_name or "", p.info.run_id, p.info.status,
                         _fmt_time(p.info.start_time), _fmt_best(metric, best)))
            for k, b in zip(kids, bests):
                rows.append(("", "  " + (k.info.run_name or ""), k.info.run_id, k.info.status,
                             _fmt_time(k.info.start_time), _fmt_best(metric, b)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _best(client, run, metric: str, mode: str) -> float | None:
    """Max or min of ``metric`` over the run's whole history, NaN points skipped."""
    if metric not in run.data.metrics:
        return None
    values = [m.value for m in client.get_metric_history(run.info.run_id, metric)
              if not math.isnan(m.value)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _fmt_best(metric: str | None, value: float | None) -> str:
    return "-" if metric is None or value is None else f"{metric}={value:.6g}"
