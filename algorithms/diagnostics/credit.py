"""Credit-assignment diagnostics: pure functions on episodes, each with its definition.

Definitions: docs/methods.md#credit-and-convergence (Pignatelli et al., TMLR 2024,
arXiv 2312.01072: credit as action influence; delay as the depth challenge). Shape letters: T steps
of one episode, A discrete actions.

One episode gives rewards r_0..r_{T-1} and the learner's estimates at the visited states:

- value estimate u_t: V(s_t) for state-value learners (PPO), Q(s_t, a_t) at the action taken for
  action-value learners (DQN, SAC, WPO, EVE); u_T is the estimate at the final observation (V(s_T),
  or Q(s_T, a*) with a* the learner's deterministic action) and counts only when the episode was
  truncated (a terminal state has value 0).
- TD error δ_t = r_t + γ·u_{t+1}·(1 − terminal_{t+1}) − u_t  (Sutton & Barto 2018, eq. 6.5; with Q this
  is the SARSA error on the sampled next action).
- advantage: V learners: GAE A_t = Σ_k (γλ)^k δ_{t+k} (Schulman et al. 2016, eq. 16, truncated at the
  episode's end); Q learners: A_t = Q(s_t, a_t) − Q(s_t, a*(s_t)) (given by the adapter).
- Monte-Carlo return G_t = Σ_{k=0}^{T−1−t} γ^k r_{t+k} + γ^{T−t}·u_T·truncated; value error
  e_t = u_t − G_t (positive: over-estimation).
- delay d_t = min{k ≥ 0 : r_{t+k} ≠ 0}: steps to the next non-zero reward (0 when r_t ≠ 0 itself);
  undefined ("none") when no non-zero reward follows within the episode.
- action influence: discrete: spread max_a Q(s_t, a) − min_a Q(s_t, a); continuous: ‖∇_a Q(s_t, a)‖₂
  at a = a_t.

Binning by delay (:data:`DEFAULT_DELAY_EDGES`, lower edges e_0 = 0 < e_1 < ...): step t falls in bin i
when e_i ≤ d_t < e_{i+1}; labels ``0``, ``1``, ``2_3``, ``4_7``, ..., ``<e_last>_up``, and ``none``.

Result keys (:func:`credit_metrics`; ``<s>`` one of mean, std):
  credit/td_error_<s>, credit/advantage_<s>, credit/value_error_<s>, credit/action_influence_<s>
  and each of them per bin: credit/<name>_<s>/delay_<label>
  credit/delay_fraction/delay_<label>     fraction of the steps in the bin
  credit/episodes, credit/steps
Statistics pool all steps of all episodes (population std, ddof = 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_DELAY_EDGES: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
NO_REWARD = -1
"""delay value of steps followed by no non-zero reward in their episode"""
PREFIX = "credit"


def steps_to_next_reward(rewards: Sequence[float] | np.ndarray) -> np.ndarray:
    """d_t = min{k ≥ 0 : r_{t+k} ≠ 0}, or :data:`NO_REWARD` (−1) when none follows. [T] -> int [T]."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.full(r.shape, NO_REWARD, dtype=np.int64)
    nxt = NO_REWARD
    for t in range(r.size - 1, -1, -1):
        if r[t] != 0:
            nxt = t
        out[t] = nxt - t if nxt != NO_REWARD else NO_REWARD
    return out


def delay_bin_labels(edges: Sequence[int] = DEFAULT_DELAY_EDGES) -> list[str]:
    """Labels of the bins with lower edges ``edges`` (see module docstring), then ``none``."""
    _check_edges(edges)
    labels = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] - 1 if i + 1 < len(edges) else None
        labels.append(str(lo) if hi == lo else f"{lo}_{hi}" if hi is not None else f"{lo}_up")
    return labels + ["none"]


def _check_edges(edges: Sequence[int]) -> None:
    e = list(edges)
    if not e or e[0] != 0 or any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"delay_edges must start at 0 and increase strictly, got {e}")


def delay_bins(delays: np.ndarray, edges: Sequence[int] = DEFAULT_DELAY_EDGES) -> np.ndarray:
    """Bin index of each delay: i with e_i ≤ d < e_{i+1}; len(edges) for d = NO_REWARD (bin ``none``)."""
    _check_edges(edges)
    d = np.asarray(delays)
    idx = np.searchsorted(np.asarray(edges), d, side="right") - 1
    return np.where(d == NO_REWARD, len(edges), idx)


def discounted_returns(rewards: Sequence[float] | np.ndarray, gamma: float, bootstrap: float = 0.0) -> np.ndarray:
    """G_t = Σ_{k=0}^{T−1−t} γ^k r_{t+k} + γ^{T−t}·bootstrap. [T] -> [T]."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(r)
    g = float(bootstrap)
    for t in range(r.size - 1, -1, -1):
        g = r[t] + gamma * g
        out[t] = g
    return out


def td_errors(rewards: np.ndarray, values: np.ndarray, final_value: float, terminated: bool,
              gamma: float) -> np.ndarray:
    """δ_t = r_t + γ u_{t+1} − u_t with u_T = final_value if not terminated else 0. [T] -> [T]."""
    r = np.asarray(rewards, dtype=np.float64)
    u = np.asarray(values, dtype=np.float64)
    if u.shape != r.shape:
        raise ValueError(f"values {u.shape} and rewards {r.shape} must have the same shape [T]")
    nxt = np.append(u[1:], 0.0 if terminated else float(final_value))
    return r + gamma * nxt - u


def gae_advantages(deltas: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """A_t = Σ_{k≥0} (γλ)^k δ_{t+k} over the rest of the episode (Schulman et al. 2016, eq. 16)."""
    return discounted_returns(deltas, gamma * lam)


def value_errors(values: np.ndarray, returns: np.ndarray) -> np.ndarray:
    """e_t = u_t − G_t (positive: the learner over-estimates the Monte-Carlo return)."""
    return np.asarray(values, dtype=np.float64) - np.asarray(returns, dtype=np.float64)


def action_spread(q_values: Tensor | np.ndarray) -> np.ndarray:
    """Discrete action influence max_a Q(s, a) − min_a Q(s, a). [T, A] -> [T]."""
    q = np.asarray(q_values.detach().cpu() if isinstance(q_values, Tensor) else q_values, dtype=np.float64)
    if q.ndim != 2:
        raise ValueError(f"q_values must be [T, A], got shape {q.shape}")
    return q.max(axis=1) - q.min(axis=1)


def action_gradient_norm(q_fn: Callable[[Tensor, Tensor], Tensor], obs: Tensor, actions: Tensor) -> np.ndarray:
    """Continuous action influence ‖∇_a Q(s, a)‖₂ at the given actions. obs [T, ...], actions [T, D] -> [T].

    ``q_fn(obs, actions)`` returns Q [T]; the rows are independent, so ∇ of Σ_t Q gives every row's gradient.
    """
    a = actions.detach().clone().float().requires_grad_(True)
    with torch.enable_grad():
        q = q_fn(obs, a)
        (grad,) = torch.autograd.grad(q.sum(), a)
    return grad.detach().double().norm(dim=-1).cpu().numpy()


@dataclass
class CreditEpisode:
    """One episode and the learner's estimates on it (see the module docstring for the symbols).

    rewards, values: [T]; final_value: u_T; advantages: [T] for Q learners (None: GAE from the TD
    errors); action_influence: [T] or None (learners without Q).
    """

    rewards: np.ndarray
    values: np.ndarray
    final_value: float
    terminated: bool
    advantages: np.ndarray | None = None
    action_influence: np.ndarray | None = None


def episode_quantities(ep: CreditEpisode, gamma: float, lam: float) -> dict[str, np.ndarray]:
    """Per-step td_error, advantage, value_error, action_influence (when known) and delay of one episode."""
    r = np.asarray(ep.rewards, dtype=np.float64)
    delta = td_errors(r, ep.values, ep.final_value, ep.terminated, gamma)
    g = discounted_returns(r, gamma, 0.0 if ep.terminated else ep.final_value)
    out = {
        "td_error": delta,
        "advantage": gae_advantages(delta, gamma, lam) if ep.advantages is None else np.asarray(ep.advantages, float),
        "value_error": value_errors(ep.values, g),
        "delay": steps_to_next_reward(r),
    }
    if ep.action_influence is not None:
        out["action_influence"] = np.asarray(ep.action_influence, dtype=np.float64)
    return out


def credit_metrics(episodes: Sequence[CreditEpisode], gamma: float, lam: float = 0.95,
                   edges: Sequence[int] = DEFAULT_DELAY_EDGES) -> dict[str, float]:
    """Result keys of the module docstring, pooled over all steps of ``episodes``."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    labels = delay_bin_labels(edges)
    per = [episode_quantities(ep, gamma, lam) for ep in episodes if len(ep.rewards)]
    out: dict[str, float] = {f"{PREFIX}/episodes": float(len(per))}
    if not per:
        out[f"{PREFIX}/steps"] = 0.0
        return out
    bins = np.concatenate([delay_bins(p["delay"], edges) for p in per])
    out[f"{PREFIX}/steps"] = float(bins.size)
    for i, label in enumerate(labels):
        out[f"{PREFIX}/delay_fraction/delay_{label}"] = float((bins == i).mean())
    for name in ("td_error", "advantage", "value_error", "action_influence"):
        if not all(name in p for p in per):
            continue
        x = np.concatenate([p[name] for p in per])
        out[f"{PREFIX}/{name}_mean"] = float(x.mean())
        out[f"{PREFIX}/{name}_std"] = float(x.std())
        for i, label in enumerate(labels):
            sel = x[bins == i]
            if sel.size:
                out[f"{PREFIX}/{name}_mean/delay_{label}"] = float(sel.mean())
                out[f"{PREFIX}/{name}_std/delay_{label}"] = float(sel.std())
    return out
