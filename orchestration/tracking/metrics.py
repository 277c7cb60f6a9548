"""Tune result -> MLflow metrics and params: pure functions, no MLflow calls.

Each result is flattened with ``/``; numeric leaves (bool -> 0/1) whose first key segment is a metric
group (``METRIC_GROUPS`` plus ``extra_metric_prefixes``) are logged with step ``result["steps"]``
(fallback ``training_iteration``). NaN and +-inf are logged as they are: MLflow stores them, and a
diverging loss is exactly what a curve must show. Added by the callback (never overriding a key the
trial reported itself):
- ``system/iteration_time_s`` = ``time_this_iter_s``;
- ``system/steps_per_s`` = (steps_t - steps_{t-1}) / time_this_iter_s;
- ``system/env_steps_per_s`` = env steps sampled this iteration / time_this_iter_s (RLlib's
  ``num_env_steps_sampled`` under ``env/`` or ``env_runners/``);
- ``system/updates_per_s`` = sum over learner modules of num_module_steps_trained /
  module_train_batch_size_mean (minibatch SGD updates this iteration) / time_this_iter_s;
- ``hparam/<config.key>``: a numeric config value that changed since the trial's previous result
  (PBT mutations; MLflow params cannot change). Tune's scheduler mutates ``trial.config`` before
  callbacks see the result that triggered the exploit, so the new value is logged at that result's
  step: the trial trains with it from that step on. If that result is dropped (the exploit restarts
  the trial from an older checkpoint), the value moves to the next result that is kept
  (:mod:`orchestration.tracking.delivery`).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

METRIC_GROUPS: tuple[str, ...] = (
    "env", "eval", "learner", "train", "plasticity", "credit", "exploration", "uncertainty",
    "convergence", "meta", "system", "hparam",
)

# MLflow's limits (mlflow.utils.validation): key length, param value length.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def sanitize_key(key: str) -> str:
    """Map ``key`` to a name MLflow accepts: letters, digits, ``_ - . /`` and space, no empty,
    ``.`` or ``..`` path segments, no leading slash, at most 250 characters."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p if p not in ("", ".", "..") else "_" for p in key.strip("/").split("/")]
    return "/".join(parts)[:MAX_KEY_LENGTH] or "_"


def flatten(tree: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level, keys joined with ``sep``: {"a": {"b": 1}} -> {"a<sep>b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out


def as_number(value: Any) -> float | None:
    """A metric value as float (bool -> 0.0/1.0, numpy and 0-d array scalars too), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config as MLflow params: nested keys joined with ``.``, keys sanitised, values
    stringified and cut to MLflow's 6000 characters."""
    return {
        sanitize_key(k): str(v)[:MAX_PARAM_VALUE_LENGTH] for k, v in flatten(config, ".").items()
    }


def metric_leaves(result: Mapping[str, Any], groups: Iterable[str]) -> dict[str, float]:
    """Numeric leaves of ``result`` flattened with ``/`` whose first segment is in ``groups``."""
    groups = set(groups)
    out: dict[str, float] = {}
    for top, sub in result.items():
        if str(top).split("/", 1)[0] not in groups:
            continue
        leaves = flatten(sub, "/", str(top)) if isinstance(sub, Mapping) else {str(top): sub}
        for k, v in leaves.items():
            x = as_number(v)
            if x is not None:
                out[sanitize_key(k)] = x
    return out


def result_step(result: Mapping[str, Any]) -> int | None:
    """The MLflow step of a result: ``steps`` (env steps or task steps), else training_iteration."""
    for key in ("steps", "training_iteration"):
        x = as_number(result.get(key))
        if x is not None and math.isfinite(x):
            return int(x)
    return None


def _first(flat: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    for k in keys:
        x = as_number(flat.get(k))
        if x is not None and math.isfinite(x):
            return x
    return None


def throughput_metrics(flat: Mapping[str, Any], prev_steps: float | None) -> dict[str, float]:
    """``system/`` throughput of one result (see the module docstring for the definitions).

    ``flat`` is the result flattened with ``/``; ``prev_steps`` the previous result's step counter.
    """
    out: dict[str, float] = {}
    dt = _first(flat, ["time_this_iter_s"])
    if dt is None:
        return out
    out["system/iteration_time_s"] = dt
    if dt <= 0:
        return out
    steps = _first(flat, ["steps"])
    if steps is not None and prev_steps is not None and steps >= prev_steps:
        out["system/steps_per_s"] = (steps - prev_steps) / dt
    env_steps = _first(flat, ["env/num_env_steps_sampled", "env_runners/num_env_steps_sampled"])
    if env_steps is not None:
        out["system/env_steps_per_s"] = env_steps / dt
    updates = 0.0
    found = False
    for k, v in flat.items():
        head, _, tail = k.rpartition("/")
        if tail != "num_module_steps_trained" or head.split("/", 1)[0] not in ("learner", "learners"):
            continue
        if head.endswith("__all_modules__"):
            continue
        trained = as_number(v)
        batch = as_number(flat.get(f"{head}/module_train_batch_size_mean"))
        if trained is not None and batch and batch > 0:
            updates += trained / batch
            found = True
    if found:
        out["system/updates_per_s"] = updates / dt
    return out


def changed_hparams(old: Mapping[str, str], new_config: Mapping[str, Any]) -> dict[str, float]:
    """``hparam/<key>`` for each numeric value of the flattened config that differs from ``old``
    (the previous flattened params)."""
    out = {}
    for k, v in flatten(new_config, ".").items():
        key = sanitize_key(k)
        x = as_number(v)
        if x is not None and key in old and old[key] != str(v):
            out[sanitize_key(f"hparam/{k}")] = x
    return out
