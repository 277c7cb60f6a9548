"""The DataRater bilevel objective as pure functions (Calian et al. 2025, §2, eq. 1-2).

    inner:  L_in(θ, η; b) = Σ_{i∈b} σ_b(φ_η(x))_i · ℓ(θ; x_i),   σ_b(s)_i = exp(s_i) / Σ_{j∈b} exp(s_j)
    outer:  L_out(θ; b') = 1/|b'| Σ_{i∈b'} ℓ(θ; x_i)   on held-out (clean) data

φ_η is the rater (one scalar score per example); the softmax is over the examples of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from algorithms.meta.engines import MeanOuterLoss, Meta, WeightedInnerLoss
from algorithms.meta.optimizers import Params


class Batch(NamedTuple):
    """x: model input; y: target (labels, or the tokens themselves for an LM); r: rater input."""

    x: Tensor
    y: Tensor
    r: Tensor


def batch_softmax_weights(scores: Tensor) -> Tensor:
    """σ_b(s)_i = exp(s_i) / Σ_j exp(s_j) over the batch dimension. scores[B] -> weights[B], Σ = 1."""
    return torch.softmax(scores, dim=0)


def make_inner_loss(
    model_fn: Callable[[Params, Tensor], Tensor],
    rater_fn: Callable[[Meta, Tensor], Tensor],
    per_example_loss: Callable[[Tensor, Tensor], Tensor],
    microbatch: int | None = None,
) -> WeightedInnerLoss:
    """L_in(θ, η; b) = Σ_i σ_b(φ_η(r))_i ℓ(f_θ(x_i), y_i)."""

    def losses(params: Params, batch: Batch) -> Tensor:
        return per_example_loss(model_fn(params, batch.x), batch.y)

    def weights(meta: Meta, batch: Batch) -> Tensor:
        return batch_softmax_weights(rater_fn(meta, batch.r))

    return WeightedInnerLoss(losses, weights, microbatch)


def make_outer_loss(
    model_fn: Callable[[Params, Tensor], Tensor],
    per_example_loss: Callable[[Tensor, Tensor], Tensor],
    microbatch: int | None = None,
) -> MeanOuterLoss:
    """L_out(θ; b') = mean_i ℓ(f_θ(x_i), y_i)."""
    return MeanOuterLoss(lambda params, batch: per_example_loss(model_fn(params, batch.x), batch.y), microbatch)
