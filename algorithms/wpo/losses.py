"""WPO losses as pure functions (Pfau et al., "Wasserstein Policy Optimization", ICML 2025, arXiv 2505.00663).

Shape letters: B batch of states, N sampled actions per state, D action dimensions. Every function
takes tensors (network outputs, samples) and returns tensors; no networks, no RLlib.

The WPO update for policy parameters θ is (paper, eq. 6 with the Fisher preconditioner)

    Δθ = F⁻¹ · E_{s, a~π}[ ∇_θ ∇_a log π_θ(a|s) · ∇_a Q(s, a) ].

For a diagonal Gaussian π = N(μ, diag σ²) the Fisher over (μ, σ) per dimension is diag(1/σ², 2/σ²), so
F⁻¹ scales the gradient reaching μ by σ² and the one reaching σ by σ²/2 (:func:`fisher_preconditioned`
does this without changing forward values). Per dimension the update is then

    Δμ ∝ E[∇_a Q],    Δσ ∝ E[((a − μ)/σ) · ∇_a Q].

With a tanh-squashed policy a = tanh(u) the same update runs on u with ∇_u Q(s, tanh u) in place of
∇_a Q (:func:`tanh_squash_grad`; docs/methods.md#wpo, "Action bounds").
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor


def fisher_preconditioned(mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """(μ', σ') equal to (μ, σ) in value whose gradients reach (μ, σ) scaled by (σ², σ²/2) (docs/methods.md#wpo):

        μ' = sg(σ²)·μ + sg((1 − σ²)·μ),    σ' = sg(σ²/2)·σ + sg((1 − σ²/2)·σ)      (sg = stop-gradient)

    Args: mean, std: [..., D]. Returns (μ', σ') of the same shape.
    """
    var = std.detach().square()
    mean_p = var * mean + ((1.0 - var) * mean).detach()
    std_p = 0.5 * var * std + ((1.0 - 0.5 * var) * std).detach()
    return mean_p, std_p


def gaussian_grad_log_prob(actions: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """∇_a log N(a; μ, diag σ²) = −(a − μ)/σ², with a graph to (μ, σ) and ``actions`` held constant.

    Args: actions [N, B, D]; mean, std [B, D]. Returns [N, B, D].
    """
    return -(actions.detach() - mean.unsqueeze(0)) / std.unsqueeze(0).square()


def cube_root(x: Tensor) -> Tensor:
    """sign(x)·|x|^(1/3): optional squashing of ∇_a Q (the paper's variant for large action gradients)."""
    return torch.sign(x) * x.abs().pow(1.0 / 3.0)


def out_of_bounds_grad(actions: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """∇_a of −‖a − clip(a, low, high)‖²: −2·(a − clip(a, low, high)), zero inside the bounds.

    Added (times a coefficient c) to ∇_a Q, it makes the policy loss that of the penalised critic
    Q(s, a) − c·‖a − clip(a)‖². Without it, an unsquashed Gaussian policy whose env clips actions gets
    no signal back into the bounds and its mean can drift far outside them (bang-bang control); the
    idea follows MO-MPO's action penalisation (Abdolmaleki et al. 2020), here as a plain penalty.

    Args: actions [..., D] in the normalised action space. Returns the same shape.
    """
    return -2.0 * (actions - actions.clamp(low, high))


PolicyBound = Literal["none", "tanh_mean", "tanh_squash"]
"""Allowed ``policy_bound`` values (WPOSettings.policy_bound; docs/methods.md#wpo, "Action bounds")."""
POLICY_BOUNDS: tuple[str, ...] = get_args(PolicyBound)


def to_action(x: Tensor, policy_bound: str) -> Tensor:
    """Env-space action of a Gaussian variable x: tanh(x) for ``tanh_squash`` (x = u, the pre-squash
    sample or mean), x itself otherwise (``none``; ``tanh_mean``, whose mean is already tanh(μ_raw)).

    Applied to a sample it gives the action; applied to the mean it gives the deterministic (eval)
    action and the mean reported in action space. Args: x [..., D]. Returns the same shape.
    """
    return torch.tanh(x) if policy_bound == "tanh_squash" else x


def tanh_squash_grad(pre_actions: Tensor, grad_q: Tensor) -> Tensor:
    """∇_u Q(s, tanh u) = (1 − tanh² u) ⊙ ∇_a Q(s, a)|_{a = tanh u}: the action gradient WPO's Gaussian
    update needs when the policy is a = tanh(u), u ~ N(μ, diag σ²) (``policy_bound="tanh_squash"``).

    Derivation (docs/methods.md#wpo, "Action bounds"): the Wasserstein gradient flow is taken in u-space
    (Euclidean metric on u), where the policy is the Gaussian p_u and the objective is
    J = E_{u~p_u}[Q̃(s, u)] with Q̃(s, u) = Q(s, tanh u). Its velocity field is ∇_u Q̃ = J_tanh(u)ᵀ ∇_a Q,
    J_tanh = diag(1 − tanh² u), and its projection onto θ is the paper's eq. 6 for the Gaussian p_u:

        Δθ ∝ F⁻¹ E_{u~p_u}[ ∇_θ ∇_u log p_u(u|s) · ∇_u Q̃(s, u) ]

    with p_u's own (μ, σ) Fisher (the Fisher of θ is the same for p_u and for the squashed π_a, a
    bijection of the sample space does not change it). The change-of-variables term −Σ log(1 − a²)
    of log π_a never appears: p_u is a plain Gaussian. (Taking the flow in a-space instead, where that
    term does appear, its ∇_a is θ-independent and drops out of ∇_θ∇_a, but the update becomes
    E[∇_θ∇_u log p_u · (1 − a²)⁻¹ ∇_a Q], which blows up at the bounds; the u-space flow is the a-space
    flow under the metric da²/(1 − a²)², for which the bounds are infinitely far away.)

    1 − tanh² u is computed as 4·sigmoid(2u)·sigmoid(−2u) (exact for large |u|, no cancellation).

    Args: pre_actions u [N, B, D] (the Gaussian samples, constants); grad_q ∇_a Q [N, B, D] at a = tanh u.
    Returns ∇_u Q̃ [N, B, D].
    """
    two_u = 2.0 * pre_actions.detach()
    return 4.0 * torch.sigmoid(two_u) * torch.sigmoid(-two_u) * grad_q


def mean_bound_stats(mean_action: Tensor) -> dict[str, Tensor]:
    """Statistics of the policy mean in action space [..., D] (after ``to_action``): ``policy_mean_abs``
    (mean |μ_a|), ``policy_mean_out_of_bounds`` (fraction of components with |μ_a| > 1; 0 by
    construction for the tanh bounds) and ``policy_mean_saturated`` (fraction with |μ_a| > 0.99, where
    tanh' < 0.02: the bounded policies' analogue of drifting out, a saturated tanh passes little gradient)."""
    m = mean_action.detach().abs()
    return {"policy_mean_abs": m.mean(), "policy_mean_out_of_bounds": (m > 1.0).float().mean(),
            "policy_mean_saturated": (m > 0.99).float().mean()}


def wpo_policy_loss(grad_log_prob: Tensor, grad_q: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """−mean_b Σ_n Σ_d ∇_a log π(a_n|s_b) · ∇_a Q(s_b, a_n)   (Pfau et al. 2025, eq. 6; docs/methods.md#wpo).

    Args:
        grad_log_prob: [N, B, D] ∇_a log π at the sampled actions, with a graph to the policy (use
            :func:`gaussian_grad_log_prob` on :func:`fisher_preconditioned` parameters for WPO's update).
        grad_q: [N, B, D] ∇_a Q(s, a_n) from the online critic; detached here.
        mask: [B] 1 for states that get a policy update, 0 for masked (terminal) states; default all 1.
            The mean is over the unmasked states.

    Returns the scalar loss and statistics (``grad_q_abs_mean``, ``grad_q_norm``).
    """
    grad_q = grad_q.detach()
    per_state = (grad_log_prob * grad_q).sum(dim=(0, 2))  # [B]
    if mask is None:
        loss = -per_state.mean()
    else:
        mask = mask.to(per_state.dtype)
        loss = -(per_state * mask).sum() / mask.sum().clamp_min(1.0)
    stats = {"grad_q_abs_mean": grad_q.abs().mean(), "grad_q_norm": grad_q.norm(dim=-1).mean()}
    return loss, stats


def decoupled_gaussian_kl(
    target_mean: Tensor, target_std: Tensor, mean: Tensor, std: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-dimension decoupled KLs from the target policy (MPO style; Abdolmaleki et al. 2018):

        KL_μ = KL(N(μ_t, σ_t) ‖ N(μ, σ_t)) = (μ − μ_t)² / (2 σ_t²)
        KL_σ = KL(N(μ_t, σ_t) ‖ N(μ_t, σ)) = log(σ/σ_t) + σ_t² / (2 σ²) − 1/2

    Args: [B, D] each (target ones are detached). Returns (KL_μ, KL_σ), each [B, D].
    """
    target_mean, target_std = target_mean.detach(), target_std.detach()
    kl_mean = (mean - target_mean).square() / (2.0 * target_std.square())
    kl_std = torch.log(std / target_std) + target_std.square() / (2.0 * std.square()) - 0.5
    return kl_mean, kl_std


def alpha_from_log(log_alpha: Tensor) -> Tensor:
    """α = softplus(log α) + 1e-8: the KL penalty weights (docs/methods.md#wpo)."""
    return F.softplus(log_alpha) + 1e-8


def kl_penalty(
    kl_mean: Tensor, kl_std: Tensor, log_alpha_mean: Tensor, log_alpha_std: Tensor,
    epsilon_mean: float, epsilon_std: float,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Penalty α_μ·Σ_d mean_b KL_μ + α_σ·Σ_d mean_b KL_σ (α held constant) and the MPO dual loss
    α_μ·Σ_d(ε_μ − sg(mean_b KL_μ)) + α_σ·Σ_d(ε_σ − sg(mean_b KL_σ)) that learns α when its log α
    require gradients (the reference configuration keeps α fixed; docs/methods.md#wpo).

    Args: kl_mean, kl_std [B, D]; log_alpha_mean, log_alpha_std scalars or [D].
    Returns (penalty, dual_loss, statistics).
    """
    kl_m, kl_s = kl_mean.mean(0), kl_std.mean(0)  # [D]
    alpha_m, alpha_s = alpha_from_log(log_alpha_mean), alpha_from_log(log_alpha_std)
    penalty = (alpha_m.detach() * kl_m).sum() + (alpha_s.detach() * kl_s).sum()
    dual = (alpha_m * (epsilon_mean - kl_m.detach())).sum() + (alpha_s * (epsilon_std - kl_s.detach())).sum()
    stats = {
        "kl_mean": kl_m.sum(), "kl_std": kl_s.sum(),
        "kl_mean_rel": kl_m.mean() / epsilon_mean, "kl_std_rel": kl_s.mean() / epsilon_std,
        "alpha_mean": alpha_m.detach().mean(), "alpha_std": alpha_s.detach().mean(),
    }
    return penalty, dual, stats


def clipped_double_q(target_q: Tensor) -> Tensor:
    """min_i Q_targ,i(s', a'_m) per target action: clipped double-Q (Fujimoto et al. 2018, eq. 10) on WPO's
    M target-policy actions.

    Fed to :func:`expected_sarsa_targets` it gives y = R^(n) + d·(1/M) Σ_m min_i Q_targ,i(s', a'_m): the min
    over the critics per sampled action, then the mean over the M actions, i.e. the Monte Carlo estimate
    of E_{a'~π_targ}[min_i Q_targ,i(s', a')], the expectation of TD3's per-sample target (its a' carries
    target-policy noise) and SAC's clipped target without the entropy term. It is ≤ min_i (1/M) Σ_m
    Q_targ,i(s', a'_m), the min after the mean (E[min] ≤ min E), which would be the less pessimistic choice.

    Args: target_q [C, M, B], C critics' targets at the same M target actions. Returns [M, B].
    """
    return target_q.min(dim=0).values


def expected_sarsa_targets(nstep_return: Tensor, bootstrap_discount: Tensor, target_q: Tensor) -> Tensor:
    """y = R_t^(n) + γ^{n'}·(1 − terminal)·mean_m Q_targ(s_{t+n'}, a'_m),  a'_m ~ π_targ(·|s_{t+n'}).

    Args: nstep_return [B], bootstrap_discount [B] (γ^{n'}·(1 − terminated), from the replay),
    target_q [M, B] target critic at M target-policy actions. Returns [B] (no gradient).
    """
    return (nstep_return + bootstrap_discount * target_q.mean(0)).detach()


def critic_loss(q: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5·mean_b (y_b − Q(s_b, a_b))² (a plain scalar critic, as in Pfau et al. 2025). Args: q, targets [B]."""
    td = targets.detach() - q
    loss = 0.5 * td.square().mean()
    return loss, {"q_mean": q.detach().mean(), "q_min": q.detach().min(), "q_max": q.detach().max(),
                  "target_q_mean": targets.mean(), "td_error_abs_mean": td.detach().abs().mean()}
