"""Delta Variances (Schmitt, Shawe-Taylor, van Hasselt 2025, arXiv 2502.14698) and posterior covariances.

Shape letters: B queries, K outputs per query, P parameters (flat layout of
:mod:`algorithms.uncertainty.params`).

For a differentiable quantity of interest u_θ(z) and a covariance surrogate Σ for the parameters,

    Var[u_θ(z)] ≈ ∇_θu(z)ᵀ Σ ∇_θu(z)                       (scalar u)
    Cov[u_θ(z)] ≈ J_z Σ J_zᵀ,  J_z = ∂u_θ(z)/∂θ [K, P]      (vector u)

one gradient per query and output, no change to the model. With Σ = H⁻¹ (the inverse Hessian of the
negative log posterior) this is the linearised Laplace approximation, exact for Bayesian linear
regression; EVE's epistemic variance of Q uses Σ = (N·F + λ)⁻¹.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from algorithms.uncertainty.jacobian import as_inputs, per_example_jacobian
from algorithms.uncertainty.params import Params, QueryFn, as_flat, num_params
from algorithms.uncertainty.posterior import diagonal_posterior_precision

Covariance = Tensor | Mapping[str, Tensor] | Callable[[Tensor], Tensor]
"""Σ as a diagonal [P] (or a dict shaped like the params), a full matrix [P, P], or a callable
``v [M, P] -> (Σ v_m)_m [M, P]`` (e.g. a low-rank or Kronecker-factored operator)."""


def apply_covariance(covariance: Covariance, vectors: Tensor, params: Params) -> Tensor:
    """Rows Σ v_m for v = ``vectors`` [M, P]; Σ given as in :data:`Covariance`."""
    total = num_params(params)
    if callable(covariance) and not isinstance(covariance, Tensor):
        out = covariance(vectors)
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(vectors.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out)
            raise ValueError(f"covariance callable returned {got}; expected a Tensor of shape {tuple(vectors.shape)}")
        return out
    if isinstance(covariance, Tensor) and covariance.dim() == 2:
        if tuple(covariance.shape) != (total, total):
            raise ValueError(f"covariance matrix has shape {tuple(covariance.shape)}; expected ({total}, {total})")
        return vectors @ covariance.to(vectors).T
    diag = as_flat(covariance, params, "covariance")
    return vectors * diag.to(vectors)


def delta_variance(
    fn: QueryFn,
    params: Params,
    inputs: Tensor | Sequence[Tensor],
    covariance: Covariance,
    *,
    output_covariance: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Delta Variance of u_θ(z) for each of B queries: ∇_θuᵀ Σ ∇_θu (Schmitt et al. 2025, eq. 1).

    Args:
        fn: ``fn(params, *z) -> u`` for ONE query z (no batch dim), u a scalar or a vector [K].
        params: θ̂ by name (e.g. :func:`algorithms.uncertainty.params.module_params`).
        inputs: the queries, a Tensor [B, ...] or a tuple of Tensors [B, ...] (one per argument of fn).
        covariance: Σ as a diagonal [P] or dict, a full matrix [P, P], or a callable (see Covariance).
        output_covariance: for vector u, return the full K×K covariance (True) or only the variances.
        chunk_size: evaluate at most this many queries at a time (bounds memory at chunk·K·P).

    Returns:
        [B] for scalar u; [B, K, K] (J Σ Jᵀ) or [B, K] (its diagonal) for vector u.
    """
    items, batch = as_inputs(inputs)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    step = batch if chunk_size is None else chunk_size
    pieces = []
    scalar = True
    for start in range(0, batch, max(step, 1)):
        chunk = tuple(t[start : start + step] for t in items)
        jac, scalar = per_example_jacobian(fn, params, chunk)  # [b, K, P]
        b, k, p = jac.shape
        cov_jac = apply_covariance(covariance, jac.reshape(b * k, p), params).reshape(b, k, p)
        if scalar or not output_covariance:
            pieces.append(torch.einsum("bkp,bkp->bk", jac, cov_jac))
        else:
            pieces.append(torch.einsum("bkp,blp->bkl", jac, cov_jac))
    out = torch.cat(pieces, dim=0)
    return out[:, 0] if scalar else out


def diagonal_posterior_covariance(fisher_diag: Tensor, num_data: float, damping: float) -> Tensor:
    """Σ = (N·diag F + λ)⁻¹ elementwise [P] (EVE, Schmitt et al. 2023); λ > 0 keeps it finite."""
    return diagonal_posterior_precision(fisher_diag, num_data, damping).reciprocal()


def full_posterior_covariance(fisher: Tensor, num_data: float, damping: float) -> Tensor:
    """Σ = (N·F + λ I)⁻¹ [P, P] via a Cholesky factorisation (F symmetric positive semi-definite)."""
    if fisher.dim() != 2 or fisher.shape[0] != fisher.shape[1]:
        raise ValueError(f"fisher has shape {tuple(fisher.shape)}; expected a square matrix [P, P]")
    if num_data < 0:
        raise ValueError(f"num_data must be >= 0, got {num_data}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    prec = fisher * num_data + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype, device=fisher.device)
    prec = 0.5 * (prec + prec.T)
    chol, info = torch.linalg.cholesky_ex(prec)
    if int(info) != 0:
        raise ValueError("N*F + damping*I is not positive definite: use damping > 0")
    return torch.cholesky_inverse(chol)
