"""EVE's losses and statistics as pure functions (Schmitt, Shawe-Taylor, van Hasselt 2023, arXiv 2303.04012).

Shape letters: B batch, A actions, P parameters (flat layout of :mod:`algorithms.uncertainty.params`).

Value prediction as density estimation of returns: the Q network predicts the mean of a Gaussian over
the (bootstrapped, n-step) return, p_θ(G | s, a) = N(G; Q_θ(s, a), σ²) with σ² a fixed hyperparameter.
Training maximises its log-likelihood on replayed transitions (eq. "return density" of the paper):

    L(θ) = mean_b [ (G_b − Q_θ(s_b, a_b))² / (2σ²) ] + ½ log(2πσ²)

which is Q-learning's squared TD error scaled by 1/σ². Its Fisher for one (s, a) is
∇_θQ ∇_θQᵀ / σ² (:mod:`algorithms.uncertainty.fisher`); the posterior is N(θ̂, (N·diag F + λ)⁻¹).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from algorithms.uncertainty import Params, apply_covariance, per_example_jacobian
from algorithms.uncertainty.fast import linearised_forward


def return_density_nll(q_taken: Tensor, returns: Tensor, noise_var: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the returns under N(G; Q, σ²), averaged over the batch:

        L = mean_b (G_b − Q_b)² / (2σ²) + ½ log(2πσ²)

    Args:
        q_taken: Q_θ(s_b, a_b) [B] (with a graph to θ).
        returns: the targets G_b [B] (detached n-step bootstrapped returns, :func:`nstep_q_targets`).
        noise_var: σ² > 0.

    Returns: (loss scalar, stats) with stats ``td_error_abs_mean`` and ``q_taken_mean`` (detached).
    """
    if not noise_var > 0:
        raise ValueError(f"noise_var (sigma^2) must be > 0, got {noise_var}")
    if q_taken.shape != returns.shape or q_taken.dim() != 1:
        raise ValueError(f"q_taken {tuple(q_taken.shape)} and returns {tuple(returns.shape)} must both be [B]")
    td = returns.detach() - q_taken
    loss = td.square().mean() / (2.0 * noise_var) + 0.5 * math.log(2.0 * math.pi * noise_var)
    stats = {"td_error_abs_mean": td.detach().abs().mean(), "q_taken_mean": q_taken.detach().mean()}
    return loss, stats


def nstep_q_targets(
    nstep_return: Tensor,
    bootstrap_discount: Tensor,
    next_q_target: Tensor,
    next_q_online: Tensor | None = None,
) -> Tensor:
    """n-step Q-learning targets G_b = R_b + d_b · Q_targ(s'_b, a*_b), detached [B].

    a*_b = argmax_a Q_targ(s'_b, a) (Q-learning), or argmax_a Q_online(s'_b, a) when ``next_q_online``
    is given (double Q-learning, van Hasselt et al. 2016). ``bootstrap_discount`` d_b = γ^{n'}·(1 − terminal)
    and ``nstep_return`` R_b = Σ_{k<n'} γ^k r_{t+k} come from the replay; next_q_* are [B, A].
    """
    if next_q_target.dim() != 2:
        raise ValueError(f"next_q_target has shape {tuple(next_q_target.shape)}; expected [B, A]")
    if next_q_online is None:
        boot = next_q_target.max(dim=1).values
    else:
        best = next_q_online.argmax(dim=1, keepdim=True)
        boot = next_q_target.gather(1, best).squeeze(1)
    return (nstep_return + bootstrap_discount * boot).detach()


def sampled_q_targets(
    nstep_return: Tensor,
    bootstrap_discount: Tensor,
    next_q_target: Tensor,
    noise: Tensor,
    next_q_online: Tensor | None = None,
    argmax: str = "sample",
    noise_clip: float | None = None,
) -> Tensor:
    """Q-learning targets of a (linearised) posterior sample of Q, detached [B]:

        Q̃_targ(s'_b, ·) = Q_targ(s'_b, ·) + ε_b        (ε_b = J_b δ: ``noise`` [B, A], clipped to
                                                         [-c, c] when ``noise_clip`` c is given)
        G_b = R_b + d_b · Q̃_targ(s'_b, a*_b)

    with a*_b = argmax_a Q̃_targ(s'_b, a) when ``next_q_online`` is None, else (double Q-learning) the argmax
    of the online values perturbed by the same draw, Q_θ(s'_b, ·) + ε_b (``argmax="sample"``), or of the
    unperturbed Q_θ(s'_b, ·) (``argmax="mean"``). With "sample" the selection sees the noise, so E[G] exceeds
    the unperturbed target by E[max] of the noisy values: for two equal values with independent N(0, s²)
    noise by s/√π. With "mean" the noise has mean zero in G.
    """
    if argmax not in ("sample", "mean"):
        raise ValueError(f"argmax={argmax!r} is not supported; allowed values: ('sample', 'mean')")
    if noise.shape != next_q_target.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and next_q_target {tuple(next_q_target.shape)} differ")
    if noise_clip is not None:
        noise = noise.clamp(-float(noise_clip), float(noise_clip))
    if next_q_online is not None and argmax == "sample":
        next_q_online = next_q_online + noise
    return nstep_q_targets(nstep_return, bootstrap_discount, next_q_target + noise, next_q_online)


def q_of_action_fn(q_fn: Callable[[Params, Tensor], Tensor]) -> Callable[[Params, Tensor, Tensor], Tensor]:
    """u_θ(s, a) = Q_θ(s)[a] for ONE (s, a), from ``q_fn(params, s) -> [A]`` (for per-example Jacobians).

    Selects with ``gather`` so it composes with ``torch.func.vmap``.
    """

    def fn(params: Params, obs: Tensor, action: Tensor) -> Tensor:
        q = q_fn(params, obs)
        return q.gather(0, action.long().reshape(1)).squeeze(0)

    return fn


def q_gradients(
    q_fn: Callable[[Params, Tensor], Tensor], params: Params, obs: Tensor, actions: Tensor
) -> Tensor:
    """Per-example gradients ∇_θ Q_θ(s_b, a_b) [B, P] (vmap over the batch, one reverse pass each)."""
    jac, _ = per_example_jacobian(q_of_action_fn(q_fn), params, (obs, actions))
    return jac[:, 0, :]


def linearised_q_perturbation(network: torch.nn.Module, obs: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """(Q_θ̂(s_b, ·), J_b δ) [B, A] each, with J_b = ∂Q_θ(s_b, ·)/∂θ at θ̂ and δ [P] a parameter perturbation
    (flat ``named_parameters`` order), in one forward-mode pass, detached
    (:func:`algorithms.uncertainty.fast.linearised_forward`: by hand for MLPs, else ``torch.func.jvp``)."""
    return linearised_forward(network, obs, delta)


def linearised_q_sample(network: torch.nn.Module, obs: Tensor, delta: Tensor) -> Tensor:
    """Q of a linearised posterior sample, Q_θ̂(s_b, ·) + J_b δ [B, A] (:func:`linearised_q_perturbation`).

    For δ ~ N(0, Σ) each Q(s_b, a) is Gaussian with mean Q_θ̂(s_b, a) and variance J Σ Jᵀ, the Delta
    Variance (Schmitt et al. 2025): the sample has the posterior's spread and none of the mean shift that
    perturbing a nonlinear network's weights adds. Exact (equal to Q_{θ̂+δ}) for networks linear in θ.
    """
    q, dq = linearised_q_perturbation(network, obs, delta)
    return q + dq


def q_epistemic_variance(q_grads: Tensor, covariance: Tensor, params: Params) -> Tensor:
    """Epistemic variance of Q (a Delta Variance, Schmitt et al. 2025): Var[Q(s_b, a_b)] = g_bᵀ Σ g_b [B],

    g_b = ∇_θQ_θ(s_b, a_b) [B, P] and Σ = (N·diag F + λ)⁻¹ the diagonal posterior covariance [P]."""
    return (q_grads * apply_covariance(covariance, q_grads, params)).sum(dim=1)


def posterior_std_stats(covariance: Tensor) -> dict[str, Tensor]:
    """Summary of the diagonal posterior std sqrt(Σ_pp): mean, min and max over parameters."""
    std = covariance.sqrt()
    return {"posterior_std_mean": std.mean(), "posterior_std_min": std.min(), "posterior_std_max": std.max()}


def q_value_stats(q_values: Tensor) -> dict[str, Tensor]:
    """Q statistics over a batch [B, A]: mean, max and the mean gap between the best and second best."""
    top = q_values.topk(min(2, q_values.shape[1]), dim=1).values
    gap = top[:, 0] - top[:, -1]
    return {"q_mean": q_values.mean(), "q_max": q_values.max(), "q_action_gap_mean": gap.mean()}


def clip_grad_norm_value(parameters: list[torch.nn.Parameter], max_norm: float | None) -> Tensor:
    """Global gradient norm before clipping (clips in place when ``max_norm`` is set)."""
    if max_norm is None:
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
