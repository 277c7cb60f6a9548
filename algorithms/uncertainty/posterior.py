"""Posterior sampling for EVE's epistemic Q-learning (Schmitt, Shawe-Taylor, van Hasselt 2023, arXiv 2303.04012).

P is the number of parameters (flat layout of :mod:`algorithms.uncertainty.params`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.uncertainty.params import Params, as_flat, unflatten_like


def diagonal_posterior_precision(fisher_diag: Tensor, num_data: float, damping: float, *,
                                 require_positive: bool = True) -> Tensor:
    """The diagonal Laplace posterior precision of EVE (Schmitt et al. 2023, docs/methods.md#eve):

        Λ = N · diag F + λ   [P]

    with N >= 0 the number of data points (EVE: transitions seen), diag F the Fisher diagonal and λ >= 0 the
    prior precision (damping). ``require_positive`` checks Λ > 0 everywhere (needed for Λ⁻¹ and Λ^{-1/2}).
    """
    if num_data < 0:
        raise ValueError(f"num_data must be >= 0, got {num_data}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    prec = fisher_diag * num_data + damping
    if require_positive and not bool((prec > 0).all()):
        raise ValueError("N*diag F + damping has non-positive entries: use damping > 0")
    return prec


def sample_posterior(
    params: Params,
    fisher_diag: Tensor | Params,
    num_data: float,
    damping: float,
    generator: torch.Generator,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """One Thompson sample from the diagonal Laplace posterior N(θ̂, (N·diag F + λ)⁻¹):

        θ̃ = θ̂ + scale · (N·diag F + λ)^{-1/2} ⊙ ε,   ε ~ N(0, I) drawn from ``generator``

    (EVE: sample once per episode and act greedily on Q_θ̃; ``scale`` = 1 is the posterior itself).

    Pure: ``params`` are not modified; the result is new detached tensors on the params' devices and
    dtypes. ε is drawn in float32 on the generator's device in the params' flat order, then cast and
    moved, so a seed gives the same sample on every device.

    Args:
        params: θ̂ by name.
        fisher_diag: diag F as a [P] vector or a dict shaped like ``params``.
        num_data: N, the number of data points (EVE: transitions seen).
        damping: λ >= 0 (prior precision); N·F + λ must be positive everywhere.
        generator: a seeded ``torch.Generator``; its state advances by P normal draws.
        scale: multiplies the posterior std (1 = the posterior).
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    theta = as_flat({k: v.detach() for k, v in params.items()}, params, "params")
    fisher = as_flat(fisher_diag, params, "fisher_diag").detach().to(theta)
    prec = diagonal_posterior_precision(fisher, num_data, damping)
    eps = torch.randn(theta.numel(), generator=generator, device=generator.device, dtype=torch.float32)
    sample = theta + scale * prec.rsqrt() * eps.to(theta)
    return {k: v.clone() for k, v in unflatten_like(sample, params).items()}
