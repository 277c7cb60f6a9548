"""Filtering by rater score and the score statistics reported per meta-step.

Batch top-K (Calian et al. 2025, §3.1): to train on batches of N examples with discard fraction ρ,
draw N/(1−ρ) candidates, score them, and keep the N with the highest scores (drop the lowest ρ).

Per-example acceptance: a stream of examples is filtered one at a time by accepting x iff
φ(x) ≥ q_ρ, where q_ρ is the ρ-quantile of the scores on a reference sample of the data; in
expectation this discards the same fraction ρ as batch top-K without needing a batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_rho(rho: float) -> float:
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"discard fraction rho={rho}: allowed values are 0 <= rho < 1")
    return rho


def candidates_for(n_keep: int, rho: float) -> int:
    """Number of candidates to draw so that N remain after discarding ρ: ⌈N / (1 − ρ)⌉."""
    check_rho(rho)
    return math.ceil(n_keep / (1.0 - rho) - 1e-9)


def batch_top_k(scores: Tensor, n_keep: int) -> Tensor:
    """Indices of the ``n_keep`` highest scores (ties broken by lower index), in ascending index order."""
    if not 0 < n_keep <= scores.shape[0]:
        raise ValueError(f"n_keep={n_keep}: allowed values are 1..{scores.shape[0]} (the number of scores)")
    # Stable sort on −score keeps the lower index first among equal scores.
    order = torch.sort(-scores, stable=True).indices
    return torch.sort(order[:n_keep]).values


def acceptance_threshold(reference_scores: Tensor, rho: float) -> float:
    """q_ρ: the ρ-quantile of the scores on a reference sample (linear interpolation)."""
    check_rho(rho)
    return float(torch.quantile(reference_scores.double(), rho))


def accept(scores: Tensor, threshold: float) -> Tensor:
    """Per-example acceptance rule: keep x iff φ(x) ≥ q_ρ. Returns a bool mask."""
    return scores >= threshold


def auroc(scores: Tensor, corrupted: Tensor) -> float:
    """AUROC of the scores for telling clean from corrupted examples (higher score = cleaner):

        AUROC = P(s_clean > s_corrupt) + ½ P(s_clean = s_corrupt)

    (the Mann-Whitney U statistic over all clean × corrupted pairs, via average ranks).
    """
    corrupted = corrupted.bool()
    n_pos, n_neg = int((~corrupted).sum()), int(corrupted.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s = scores.double()
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # Average the ranks of tied scores.
    uniq, inverse = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = ranks[~corrupted].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
