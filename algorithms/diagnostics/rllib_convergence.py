"""Diagnostic ``convergence``: the convergence proxies of ``convergence.py`` for RLlib algorithms.

Spec: ``diagnostics: {convergence: {every: 1, window: 5}}`` (see :class:`ConvergenceSettings`). Every
``every`` iterations (one *evaluation*), on the trial's probe set (:mod:`algorithms.diagnostics.probe`,
the same set the plasticity diagnostic uses, kept for the whole trial and saved with checkpoints),
inside the learner (first module of the first learner):

- the policy's outputs on the probe states, by policy kind (:func:`policy_outputs`):
  ``categorical`` (Discrete action space with ``action_dist_inputs``: PPO, discrete SAC) and
  ``gaussian`` (Box: ``action_dist_inputs`` = [mean, log std]; PPO continuous, SAC, WPO) give
  ``convergence/policy_kl`` = KL(π_{t−1} ‖ π_t); ``greedy`` (Q learners acting greedily: DQN,
  EVE) gives ``convergence/argmax_flip_fraction``. ``convergence/policy_change`` is whichever applies;
- ``convergence/parameter_change`` ‖θ_t − θ_{t−1}‖ over the module's parameters;
- ``convergence/feature_drift``: mean over the module's activation layers (reached by the policy
  forward) of E_s ‖φ_t(s) − φ_{t−1}(s)‖;
- ``convergence/return`` R_t (the iteration's ``env_runners/episode_return_mean``),
  ``convergence/return_change`` R_t − R_{t−1} and
  ``convergence/return_change_per_parameter_change`` |ΔR| / ‖Δθ‖;
- ``convergence/converged`` and ``convergence/parameters_moving`` by the rule in ``convergence.py``
  (window ``window`` evaluations, tolerances ``policy_tol``, ``return_rtol``, ``param_tol``);
- ``convergence/compute_s``.

Changes need a previous evaluation: they start at the second one, and restart after a restore (the
previous snapshot lives in the learner and is not checkpointed; the probe set is).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from algorithms.diagnostics import convergence as cv
from algorithms.diagnostics import plasticity as pm
from algorithms.diagnostics.probe import install_probe_persistence, probe_set_for_algorithm
from algorithms.diagnostics.registry import register_diagnostic

PREFIX = "convergence"
POLICY_KINDS = ("categorical", "gaussian", "greedy")


class ConvergenceSettings(BaseModel):
    """Settings of diagnostic ``convergence`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(1, ge=1)
    """Evaluate every K training iterations."""
    probe_size: int = Field(256, ge=1)
    """Number of probe states (the trial's shared probe set)."""
    window: int = Field(5, ge=1)
    """Evaluations over which behaviour must be stable to count as converged."""
    policy_tol: float = Field(0.01, ge=0)
    """Largest policy change (KL in nats, or argmax-flip fraction) that counts as stable."""
    return_rtol: float = Field(0.05, ge=0)
    """Largest |ΔR| / max(|R_{t−1}|, 1) that counts as stable."""
    param_tol: float = Field(1e-8, ge=0)
    """Mean ‖Δθ‖ over the window above which parameters count as still moving."""
    seed: int | None = None
    """Seed of the probe set (default: the algorithm's seed)."""


def policy_outputs(module: Any, obs: Tensor, action_space: gym.Space) -> tuple[str, Tensor]:
    """(policy kind, outputs on ``obs``): categorical -> logits [N, A]; gaussian -> [mean, log std]
    [N, 2D]; greedy -> Q(s, ·) [N, A]. Raises for modules with none of them."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis import QNetAPI

    from algorithms.diagnostics.rllib_credit import q_all

    discrete = isinstance(action_space, gym.spaces.Discrete)
    if hasattr(module, "q_values") and discrete:
        return "greedy", module.q_values(obs)
    out = module.forward_inference({Columns.OBS: obs})
    if Columns.ACTION_DIST_INPUTS in out:
        return ("categorical" if discrete else "gaussian"), out[Columns.ACTION_DIST_INPUTS]
    if isinstance(module, QNetAPI) and discrete:
        return "greedy", q_all(module, obs)
    raise ValueError(f"convergence: cannot read a policy from {type(module).__name__}; "
                     f"allowed policy kinds: {list(POLICY_KINDS)}")


def policy_change(kind: str, prev: Tensor, now: Tensor) -> float:
    """KL(π_prev ‖ π_now) for categorical / gaussian outputs; argmax-flip fraction for greedy ones."""
    if kind == "categorical":
        return cv.categorical_kl(prev, now)
    if kind == "gaussian":
        d = prev.shape[-1] // 2
        return cv.diagonal_gaussian_kl(prev[..., :d], prev[..., d:], now[..., :d], now[..., d:])
    if kind == "greedy":
        return cv.argmax_flip_fraction(prev, now)
    raise ValueError(f"policy kind {kind!r}; allowed: {list(POLICY_KINDS)}")


def learner_convergence_metrics(learner: Any, *, probe_obs: Any) -> dict[str, Any]:
    """Runs inside a Learner: policy change, parameter change and feature drift of its first module since
    the previous call on this learner. Returns {"kind": str, "metrics": {name: value}}."""
    module_id = next(iter(learner.module.keys()))
    rl_module = learner.module[module_id]
    module = rl_module.unwrapped() if hasattr(rl_module, "unwrapped") else rl_module
    device = next(module.parameters()).device
    obs = torch.as_tensor(probe_obs, device=device)
    space = getattr(module, "action_space", None) or learner.config.action_space
    holder: dict[str, Any] = {}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            def forward() -> None:
                holder["kind"], holder["out"] = policy_outputs(module, obs, space)

            features = pm.capture_activations(module, forward)
    finally:
        module.train(was_training)
    snapshot = {"kind": holder["kind"], "out": holder["out"].detach().cpu(),
                "features": {k: v.cpu() for k, v in features.items()},
                "params": {n: p.detach().cpu().clone() for n, p in module.named_parameters()}}
    prev = getattr(learner, "_convergence_previous", None)
    learner._convergence_previous = snapshot
    metrics: dict[str, float] = {}
    if prev is not None and prev["kind"] == snapshot["kind"]:
        change = policy_change(snapshot["kind"], prev["out"], snapshot["out"])
        name = "argmax_flip_fraction" if snapshot["kind"] == "greedy" else "policy_kl"
        metrics[name] = change
        metrics["policy_change"] = change
        metrics["parameter_change"] = cv.parameter_drift(snapshot["params"], prev["params"])
        drifts = [cv.feature_drift(f, prev["features"][k]) for k, f in snapshot["features"].items()
                  if k in prev["features"] and prev["features"][k].shape == f.shape]
        if drifts:
            metrics["feature_drift"] = sum(drifts) / len(drifts)
    return {"kind": snapshot["kind"], "metrics": metrics}


def _episode_return(result: Mapping[str, Any]) -> float:
    runners = result.get("env_runners") or {}
    value = runners.get("episode_return_mean") if isinstance(runners, Mapping) else None
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def make_convergence_callback(settings: ConvergenceSettings | Mapping[str, Any] | None = None) -> type:
    """An RLlibCallback subclass reporting ``convergence/...`` with these settings (registry factory)."""
    from ray.rllib.callbacks.callbacks import RLlibCallback

    if not isinstance(settings, ConvergenceSettings):
        settings = ConvergenceSettings(**(settings or {}))
    s = settings

    class ConvergenceCallback(RLlibCallback):
        """See algorithms.diagnostics.rllib_convergence."""

        def on_algorithm_init(self, *, algorithm: Any, **kwargs: Any) -> None:
            install_probe_persistence(algorithm)

        def on_train_result(self, *, algorithm: Any, result: dict, **kwargs: Any) -> None:
            iteration = int(result.get("training_iteration", algorithm.iteration))
            if iteration % s.every != 0:
                return
            t0 = time.perf_counter()
            probe = probe_set_for_algorithm(algorithm, s.probe_size, s.seed).obs.numpy()
            first = None
            for r in algorithm.learner_group.foreach_learner(learner_convergence_metrics, probe_obs=probe):
                if not r.ok:
                    raise r.get()
                first = r.get()
                break
            hist = algorithm.__dict__.setdefault("_convergence_history", {
                "policy": [], "return_change": [], "previous_return": [], "parameter": [], "last_return": None})
            ret = _episode_return(result)
            out = {f"{PREFIX}/{k}": float(v) for k, v in (first or {}).get("metrics", {}).items()}
            if math.isfinite(ret):
                out[f"{PREFIX}/return"] = ret
            if f"{PREFIX}/policy_change" in out:
                last = hist["last_return"]
                d_ret = ret - last if last is not None and math.isfinite(ret) and math.isfinite(last) else math.nan
                d_theta = out[f"{PREFIX}/parameter_change"]
                hist["policy"].append(out[f"{PREFIX}/policy_change"])
                hist["return_change"].append(d_ret)
                hist["previous_return"].append(last if last is not None else math.nan)
                hist["parameter"].append(d_theta)
                for key in hist:
                    if key != "last_return" and len(hist[key]) > s.window:
                        del hist[key][0]
                if math.isfinite(d_ret):
                    out[f"{PREFIX}/return_change"] = d_ret
                    ratio = cv.return_change_per_parameter_change(d_ret, d_theta)
                    if math.isfinite(ratio):
                        out[f"{PREFIX}/return_change_per_parameter_change"] = ratio
            hist["last_return"] = ret if math.isfinite(ret) else hist["last_return"]
            status = cv.convergence_status(hist["policy"], hist["return_change"], hist["previous_return"],
                                           hist["parameter"], window=s.window, policy_tol=s.policy_tol,
                                           return_rtol=s.return_rtol, param_tol=s.param_tol)
            out[f"{PREFIX}/converged"] = float(status.converged)
            out[f"{PREFIX}/parameters_moving"] = float(status.parameters_moving)
            out[f"{PREFIX}/compute_s"] = time.perf_counter() - t0
            result.update(out)

    return ConvergenceCallback


register_diagnostic("convergence", ConvergenceSettings, rllib_callback=make_convergence_callback)
