"""Evaluation as in DataRater (Calian et al. 2025, §4): fresh inner models trained on unfiltered vs
rater-filtered data, held-out loss against training compute.

Compute accounting (FLOPs, counted with ``torch.utils.flop_counter.FlopCounterMode``):
- unfiltered training to step s:   C_u(s) = s · F_train
- filtered (discard ρ) to step s:  C_f(s) = s · (F_train + ⌈N/(1−ρ)⌉ · F_rate)    (rater inference)
- including meta-training:         C_f(s) + C_meta                                (all meta-steps)

Compute saved to reach the unfiltered model's final held-out loss L_u(S):
    s* = first step at which the filtered curve reaches L_u(S): the first evaluated step s_j with
         L_f(s_j) ≤ L_u(S), linearly interpolated between (s_{j−1}, L_f(s_{j−1})) and (s_j, L_f(s_j))
         (None if never reached)
    saved = 1 − C_f(s*) / C_u(S)        (reported with and without C_meta)

The rater is meta-trained once and can filter data for many trainings (the paper amortises it that
way), so the meta-training cost is also reported as the number of trainings after which it is repaid:

    n_break-even = C_meta / (C_u(S) − C_f(s*))        (inf if filtering saves nothing per training)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from algorithms.datarater.filtering import batch_top_k, candidates_for
from algorithms.datarater.objective import Batch


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward ops as dispatched)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class Curve:
    steps: list[int]
    losses: list[float]


def train_fresh(
    make_model: Callable[[], nn.Module],
    per_example_loss: Callable[[Tensor, Tensor], Tensor],
    sample_train: Callable[[torch.Generator, int], Batch],
    heldout: Batch,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
    scorer: Callable[[Tensor], Tensor] | None = None,
    rho: float = 0.0,
) -> Curve:
    """Train a fresh model with Adam on batches of N = ``batch_size``; with ``scorer`` and ρ > 0, each
    batch is the top N of ⌈N/(1−ρ)⌉ candidates by score (batch top-K). Held-out loss every ``eval_every``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n_draw = candidates_for(batch_size, rho) if scorer is not None else batch_size
    curve = Curve([], [])
    for step in range(1, steps + 1):
        b = sample_train(gen, n_draw)
        if scorer is not None and n_draw > batch_size:
            keep = batch_top_k(scorer(b.r), batch_size)
            b = Batch(b.x[keep], b.y[keep], b.r[keep])
        loss = per_example_loss(model(b.x), b.y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                curve.steps.append(step)
                curve.losses.append(float(per_example_loss(model(heldout.x), heldout.y).mean()))
    return curve


def steps_to_reach(curve: Curve, target: float, interpolate: bool = False) -> float | None:
    """First step at which the held-out loss is ≤ target (None if never).

    Without ``interpolate``: the first evaluated step s_j with L(s_j) ≤ target. With it: the step where
    the straight line from (s_{j−1}, L(s_{j−1})) to (s_j, L(s_j)) crosses the target (s_j itself when
    j is the first evaluation), so the answer is not rounded up to the evaluation interval.
    """
    prev: tuple[int, float] | None = None
    for s, loss in zip(curve.steps, curve.losses, strict=True):
        if loss <= target:
            if not interpolate or prev is None or prev[1] == loss:
                return float(s)
            s0, l0 = prev
            return s0 + (s - s0) * (l0 - target) / (l0 - loss)
        prev = (s, loss)
    return None


def compute_saved(
    steps_needed: float | None, steps_baseline: int, flops_train: float, flops_rate_per_step: float,
    flops_meta: float = 0.0,
) -> float:
    """saved = 1 − (s*·(F_train + F_rate_step) + C_meta) / (S·F_train); NaN if the target is never reached."""
    if steps_needed is None:
        return float("nan")
    return 1.0 - (steps_needed * (flops_train + flops_rate_per_step) + flops_meta) / (steps_baseline * flops_train)


def break_even_trainings(
    steps_needed: float | None, steps_baseline: int, flops_train: float, flops_rate_per_step: float,
    flops_meta: float,
) -> float:
    """n = C_meta / (S·F_train − s*·(F_train + F_rate_step)): filtered trainings that repay meta-training.

    inf if filtering saves nothing per training, NaN if the target is never reached.
    """
    if steps_needed is None:
        return float("nan")
    saved_per_training = steps_baseline * flops_train - steps_needed * (flops_train + flops_rate_per_step)
    return flops_meta / saved_per_training if saved_per_training > 0 else float("inf")
