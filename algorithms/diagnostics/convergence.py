"""Convergence diagnostics: pure functions, each with its definition.

Source: Abel et al., "On the Convergence of Bounded Agents", arXiv 2307.11044
(docs/methods.md#credit-and-convergence): an agent has converged when its behaviour no longer changes,
or changes only with internal-state change.
Computable proxies between two successive evaluations t−1, t on the same fixed probe set of N states
(:mod:`algorithms.diagnostics.probe`):

- policy change, stochastic policies: KL(π_{t−1}(·|s) ‖ π_t(·|s)) averaged over the probe states
  (categorical: :func:`categorical_kl`; diagonal Gaussian: :func:`diagonal_gaussian_kl`; a tanh-
  squashed Gaussian has the same KL as its Gaussian because KL is invariant under bijections);
- policy change, greedy policies (Q learners): the argmax-flip fraction
  (1/N) Σ_s 1[argmax_a Q_{t−1}(s, a) ≠ argmax_a Q_t(s, a)] (:func:`argmax_flip_fraction`);
- parameter change ‖θ_t − θ_{t−1}‖₂ (:func:`algorithms.diagnostics.plasticity.parameter_drift`) and
  feature drift E_s ‖φ_t(s) − φ_{t−1}(s)‖₂ (:func:`algorithms.diagnostics.plasticity.feature_drift`);
- return change ΔR_t = R_t − R_{t−1} and its ratio to the parameter change |ΔR_t| / ‖Δθ_t‖
  (:func:`return_change_per_parameter_change`).

Convergence rule (:func:`convergence_status`), over the last W evaluations (window W):
behaviour is *stable* when every policy change in the window is ≤ ``policy_tol`` and every return
change is ≤ ``return_rtol``·max(|R_{t−1}|, 1) (returns that are unknown, NaN, are not checked).
``converged`` = 1 when behaviour is stable over a full window. ``parameters_moving`` = 1 when the mean
‖Δθ‖ over the window exceeds ``param_tol``. Converged with parameters moving is Abel et al.'s case
"behaviour fixed while internal state still changes"; converged without is "both stable". Both count
as converged. Before a full window has been seen both flags are 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.diagnostics.plasticity import feature_drift, parameter_drift

__all__ = ["argmax_flip_fraction", "categorical_kl", "convergence_status", "diagonal_gaussian_kl",
           "feature_drift", "parameter_drift", "return_change_per_parameter_change", "ConvergenceStatus"]


def categorical_kl(logits_p: Tensor, logits_q: Tensor) -> float:
    """(1/N) Σ_s Σ_a p(a|s) (log p(a|s) − log q(a|s)), p = softmax(logits_p). [N, A] x2 -> scalar."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits differ in shape: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    lp = torch.log_softmax(logits_p.double(), -1)
    lq = torch.log_softmax(logits_q.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def diagonal_gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> float:
    """(1/N) Σ_s Σ_d [log σ_q/σ_p + (σ_p² + (μ_p − μ_q)²) / (2σ_q²) − 1/2]   (KL of N(μ_p, σ_p²) from
    N(μ_q, σ_q²), per dimension, summed). Inputs [N, D]."""
    mp, mq, lp, lq = (x.double() for x in (mean_p, mean_q, log_std_p, log_std_q))
    kl = lq - lp + ((2 * lp).exp() + (mp - mq) ** 2) / (2 * (2 * lq).exp()) - 0.5
    return float(kl.sum(-1).mean())


def argmax_flip_fraction(scores_prev: Tensor, scores_now: Tensor) -> float:
    """(1/N) Σ_s 1[argmax_a scores_prev(s, a) ≠ argmax_a scores_now(s, a)]. [N, A] x2 -> scalar in [0, 1]."""
    if scores_prev.shape != scores_now.shape:
        raise ValueError(f"scores differ in shape: {tuple(scores_prev.shape)} vs {tuple(scores_now.shape)}")
    return float((scores_prev.argmax(-1) != scores_now.argmax(-1)).double().mean())


def return_change_per_parameter_change(return_change: float, parameter_change: float) -> float:
    """|ΔR| / ‖Δθ‖ (NaN when ‖Δθ‖ = 0 or ΔR is unknown)."""
    if parameter_change <= 0 or not math.isfinite(return_change):
        return math.nan
    return abs(return_change) / parameter_change


@dataclass(frozen=True)
class ConvergenceStatus:
    converged: bool
    parameters_moving: bool
    evaluations_in_window: int


def convergence_status(policy_changes: Sequence[float], return_changes: Sequence[float],
                       previous_returns: Sequence[float], parameter_changes: Sequence[float], *,
                       window: int, policy_tol: float, return_rtol: float, param_tol: float) -> ConvergenceStatus:
    """The rule of the module docstring on the histories (oldest first; equal lengths, one entry per
    evaluation that had a predecessor). Only the last ``window`` entries are read."""
    n = len(policy_changes)
    if not (len(return_changes) == len(previous_returns) == len(parameter_changes) == n):
        raise ValueError("policy_changes, return_changes, previous_returns and parameter_changes need equal lengths")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if n < window:
        return ConvergenceStatus(False, False, n)
    pc = policy_changes[-window:]
    rc = return_changes[-window:]
    pr = previous_returns[-window:]
    stable = all(p <= policy_tol for p in pc) and all(
        not math.isfinite(d) or not math.isfinite(r) or abs(d) <= return_rtol * max(abs(r), 1.0)
        for d, r in zip(rc, pr))
    moving = sum(parameter_changes[-window:]) / window > param_tol
    return ConvergenceStatus(stable, bool(moving), window)
