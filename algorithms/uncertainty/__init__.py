"""Delta Variances and Fisher estimates for any torch module (docs/methods.md#delta-variances, #eve).

- :func:`delta_variance`: Var[u_θ(z)] ≈ ∇_θuᵀ Σ ∇_θu for any differentiable quantity of interest.
- :func:`fisher_full`, :func:`fisher_diagonal`, :class:`RunningDiagonalFisher`: F = E[∇_θu ∇_θuᵀ]/σ²;
  :func:`mean_sq_grad_fast` / :func:`delta_variance_fast` do the diagonal cases for MLPs without
  per-example gradients.
- :func:`diagonal_posterior_precision`: Λ = N·diag F + λ, the one place it is computed.
- :func:`diagonal_posterior_covariance`, :func:`full_posterior_covariance`: Σ = (N·F + λ)⁻¹.
- :func:`sample_posterior`: θ̃ = θ̂ + (N·diag F + λ)^{-1/2} ε (EVE's Thompson sample).
"""

from algorithms.uncertainty.delta import (
    Covariance,
    apply_covariance,
    delta_variance,
    diagonal_posterior_covariance,
    full_posterior_covariance,
)
from algorithms.uncertainty.fast import delta_variance_fast, mean_sq_grad_fast
from algorithms.uncertainty.fisher import RunningDiagonalFisher, fisher_diagonal, fisher_full
from algorithms.uncertainty.jacobian import per_example_jacobian
from algorithms.uncertainty.params import (
    Params,
    flatten_params,
    module_fn,
    module_params,
    num_params,
    unflatten_like,
)
from algorithms.uncertainty.posterior import diagonal_posterior_precision, sample_posterior

__all__ = [
    "Covariance",
    "Params",
    "RunningDiagonalFisher",
    "apply_covariance",
    "delta_variance",
    "delta_variance_fast",
    "diagonal_posterior_covariance",
    "diagonal_posterior_precision",
    "fisher_diagonal",
    "fisher_full",
    "flatten_params",
    "full_posterior_covariance",
    "mean_sq_grad_fast",
    "module_fn",
    "module_params",
    "num_params",
    "per_example_jacobian",
    "sample_posterior",
    "unflatten_like",
]
