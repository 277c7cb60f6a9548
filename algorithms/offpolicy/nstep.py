"""n-step return targets for one episode, as a pure function (the reference the tensor replay is tested
against, and usable on its own for offline data).

Notation (Sutton & Barto 2018, §7.1): an episode segment s_0, a_0, r_0, s_1, ..., s_T of T steps whose last
observation s_T is terminal (``terminated``) or a time-limit / segment cut (truncated, not terminal).
"""

from __future__ import annotations

import torch
from torch import Tensor


def nstep_targets(rewards: Tensor, terminated: bool, gamma: float, n: int) -> dict[str, Tensor]:
    """n-step targets of every step t < T of one episode segment (``rewards`` = [r_0, ..., r_{T-1}]):

        n'_t = min(n, T − t)                                   steps used (shortened at the end)
        R_t  = Σ_{k<n'_t} γ^k r_{t+k}                          n-step discounted return
        b_t  = t + n'_t                                        index of the bootstrap obs s_{t+n'}
        d_t  = γ^{n'_t} · (1 − terminated · [t + n'_t = T])    bootstrap discount

    so the target is R_t + d_t · V(s_{b_t}). A truncated end (``terminated=False``) is not terminal: it
    bootstraps from s_T. Returns a dict of [T] tensors: ``nstep_return``, ``nstep`` (int64),
    ``bootstrap_index`` (int64) and ``bootstrap_discount``, in the dtype and device of ``rewards``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected [T] (one episode)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    horizon = rewards.shape[0]
    t = torch.arange(horizon, device=rewards.device)
    steps = torch.clamp(horizon - t, max=n)
    ret = torch.zeros_like(rewards)
    for k in range(n):
        inside = (t + k) < horizon
        shifted = torch.where(inside, rewards[torch.clamp(t + k, max=max(horizon - 1, 0))], 0.0)
        ret = ret + (gamma**k) * shifted
    boot = t + steps
    discount = torch.tensor(gamma, dtype=rewards.dtype, device=rewards.device) ** steps
    if terminated:
        discount = torch.where(boot == horizon, torch.zeros_like(discount), discount)
    return {"nstep_return": ret, "nstep": steps, "bootstrap_index": boot, "bootstrap_discount": discount}
