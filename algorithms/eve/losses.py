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

from algorithms.uncertainty import Params, apply_covariance, per_example_jacobian, unflatten_like


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


def linear_squared_gradient_sum(
    network: torch.nn.Module, obs: Tensor, actions: Tensor
) -> tuple[Tensor, Tensor]:
    """Σ_b (∇_θ Q_θ(s_b, a_b))² [P] (elementwise square, flat layout of ``named_parameters``) in one
    forward and one backward pass, for networks whose parameters all sit in ``nn.Linear`` layers and
    elementwise-affine ``nn.LayerNorm`` layers. Also returns Q_θ(s_b, ·) [B, A] with its graph (so a
    loss can reuse the forward pass).

    Why it is exact: example b's output depends only on its own activations, so the gradient of
    Σ_b Q_b with respect to layer output y_b is the per-example ∂Q_b/∂y_b =: δ_b. A Linear layer
    y = W x + c has per-example gradients δ_b x_bᵀ (W) and δ_b (c), so
        Σ_b (∂Q_b/∂W)² = (δ²)ᵀ (x²),   Σ_b (∂Q_b/∂c)² = Σ_b δ_b²
    (the "sum of squared gradients" of Dangel et al. 2020, BackPACK); a LayerNorm y = γ ⊙ x̂ + β gives
    Σ_b (δ_b ⊙ x̂_b)² and Σ_b δ_b². Cost: one extra backward pass, whatever B is.
    """
    layers = [(n, m) for n, m in network.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.LayerNorm)]
    owned = {f"{n}.{k}" if n else k for n, m in layers for k, _ in m.named_parameters(recurse=False)}
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    if set(names) - owned:
        raise ValueError(
            f"linear_squared_gradient_sum supports Linear/LayerNorm parameters only; found {sorted(set(names) - owned)}"
        )
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            x = args[0]
            if isinstance(module, torch.nn.LayerNorm):
                x = torch.nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
            inputs[name] = x.detach()
            outputs[name] = out

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        with torch.enable_grad():
            q = network(obs)
            q_taken = q.gather(1, actions.long().reshape(-1, 1)).squeeze(1)
            order = [n for n, _ in layers]
            deltas = torch.autograd.grad(q_taken.sum(), [outputs[n] for n in order], allow_unused=True,
                                         retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    sq: dict[str, Tensor] = {}
    for (name, module), delta in zip(layers, deltas, strict=True):
        prefix = f"{name}." if name else ""
        if delta is None:
            delta = torch.zeros_like(outputs[name])
        d2 = delta.detach().reshape(-1, delta.shape[-1]).square()
        x = inputs[name].reshape(-1, inputs[name].shape[-1])
        if isinstance(module, torch.nn.Linear):
            sq[prefix + "weight"] = d2.T @ x.square()
        elif module.weight is not None:
            sq[prefix + "weight"] = (d2 * x.square()).sum(0)
        if getattr(module, "bias", None) is not None:
            sq[prefix + "bias"] = d2.sum(0)
    flat = torch.cat([sq[n].reshape(-1) for n in names])
    return flat, q


def linearised_q_sample(network: torch.nn.Module, obs: Tensor, delta: Tensor) -> Tensor:
    """Q of a linearised posterior sample, Q_θ̂(s_b, ·) + J_b δ [B, A] with J_b = ∂Q_θ(s_b, ·)/∂θ at θ̂ and
    δ [P] a parameter perturbation (flat ``named_parameters`` order), by one forward-mode pass (jvp).

    For δ ~ N(0, Σ) each Q(s_b, a) is Gaussian with mean Q_θ̂(s_b, a) and variance J Σ Jᵀ, the Delta
    Variance (Schmitt et al. 2025): the sample has the posterior's spread and none of the mean shift that
    perturbing a nonlinear network's weights adds. Exact (equal to Q_{θ̂+δ}) for networks linear in θ.
    """
    params = {k: v.detach() for k, v in network.named_parameters()}
    tangents = unflatten_like(delta.to(next(iter(params.values()))), params)

    def fn(p: Params) -> Tensor:
        return torch.func.functional_call(network, p, (obs,))

    q, dq = torch.func.jvp(fn, (params,), (tangents,))
    return (q + dq).detach()


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
