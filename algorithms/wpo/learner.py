"""WPOLearner: the WPO losses of ``losses.py`` on replay batches (one update = one call of the loss).

Per batch of B transitions (docs/methods.md#wpo):
- critic: y = R^(n) + γ^{n'}(1 − term)·mean_m Q_targ(s', a'_m), a'_m ~ π_targ(·|s') (M samples);
  loss 0.5·(y − Q(s, a))²; with ``critic_clip_actions`` (default, as the reference code) every action
  reaches the critic as clip(a, −1, 1), so Q(s, a) = Q(s, clip(a)) and ∇_a Q = 0 outside the bounds;
- policy: a_n ~ π(·|s) (N samples, constants), dQ_n = ∇_a Q(s, a_n) from the online critic (detached),
  loss −mean_b Σ_n Σ_d ∇_a log π'(a_n|s)·dQ_n with π' the Fisher-preconditioned Gaussian; no state in a
  replay batch is terminal (s_t always had an action taken), so the mask is all ones;
- optional out-of-bounds penalty (``action_penalty`` c > 0): dQ_n += c·∇_a(−‖a_n − clip(a_n, −1, 1)‖²), the
  policy loss of the penalised critic Q − c·‖a − clip(a)‖² (actions are in the normalised [−1, 1] space);
- decoupled KL penalty to the target policy, α fixed unless ``dual_learning``;
- twin critics (``num_critics`` 2, clipped double-Q; Fujimoto et al. 2018, eq. 10): critics Q_1, Q_2 with
  targets Q_targ,1, Q_targ,2; y = R^(n) + γ^{n'}(1 − term)·mean_m min_i Q_targ,i(s', a'_m) (``losses.clipped_double_q``),
  critic loss Σ_i 0.5·(y − Q_i(s, a))², and the policy follows dQ_n = ∇_a (1/2) Σ_i Q_i(s, a_n) (see
  :func:`wpo_loss` for why the mean);
- action bounds (``policy_bound``): ``none`` (the reference: the Gaussian is over a, unbounded);
  ``tanh_mean``: the module's policy outputs μ = tanh(μ_raw), nothing changes here; ``tanh_squash``:
  the policy outputs the Gaussian (μ_u, σ_u) of a pre-squash u, every action is a = tanh(u) (target
  actions, critic inputs), and the Gaussian update above runs on u with ∇_u Q = (1 − a²) ⊙ ∇_a Q
  (``losses.tanh_squash_grad``, applied before the optional ``squash_grad_q``); the KL is then the
  one between the u-Gaussians, which equals the KL between the squashed policies.
Optimisers: Adam for the policy, Adam for the critic (both critics with ``num_critics`` 2, clipped jointly:
one global norm over their gradients), each clipped to ``grad_clip``, Adam for log α when ``dual_learning``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from algorithms.offpolicy.learner import OffPolicyLearner, adam
from algorithms.wpo import losses as L


@dataclass(frozen=True)
class WPOSettings:
    """The loss settings of a WPOConfig (so plain loops can call :func:`wpo_loss` without RLlib)."""

    num_action_samples: int = 20
    num_target_action_samples: int = 20
    epsilon_mean: float = 0.0025
    epsilon_stddev: float = 1e-6
    dual_learning: bool = False
    squash_grad_q: str = "none"
    action_penalty: float = 0.0
    critic_clip_actions: bool = True
    policy_bound: str = "none"

    @classmethod
    def from_config(cls, config: Any) -> WPOSettings:
        return cls(int(config.num_action_samples), int(config.num_target_action_samples),
                   float(config.epsilon_mean), float(config.epsilon_stddev), bool(config.dual_learning),
                   str(config.squash_grad_q), float(config.action_penalty), bool(config.critic_clip_actions),
                   str(config.policy_bound))


def _sample(mean: Tensor, std: Tensor, n: int, generator: torch.Generator) -> Tensor:
    noise = torch.randn((n,) + tuple(mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
    return mean.unsqueeze(0) + std.unsqueeze(0) * noise


Critic = Callable[[Tensor, Tensor], Tensor]
"""``critic(obs [..., O], action [..., D]) -> Q [...]``."""


def _clip_input(critic: Critic) -> Critic:
    return lambda o, a: critic(o, a.clamp(-1.0, 1.0))


def wpo_loss(policy: nn.Module, critic: Critic | Sequence[Critic], target_policy: nn.Module,
             target_critic: Critic | Sequence[Critic], log_alpha_mean: Tensor, log_alpha_std: Tensor,
             batch: dict[str, Tensor], s: WPOSettings, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic + WPO policy + KL penalty (+ dual) loss of one replay batch; the module docstring gives the terms.

    ``policy(obs) -> (mean, std)`` [B, D] of the policy's Gaussian (over a, or over the pre-squash u when
    ``s.policy_bound == "tanh_squash"``; for ``tanh_mean`` the policy itself bounds the mean);
    ``critic(obs, action) -> Q`` [B], or a sequence of C critics (C = 2: twin critics) with
    ``target_critic`` the sequence of their targets in the same order; batch fields as in the replay
    (actions in action space). Returns the total loss and the statistics (detached scalars).

    With C critics (clipped double-Q, Fujimoto et al. 2018, eq. 10, on the expected-SARSA target):

        y   = R^(n) + d·(1/M) Σ_m min_i Q_targ,i(s', a'_m)          (min per target action, then the mean)
        L_Q = Σ_i 0.5·mean_b (y_b − Q_i(s_b, a_b))²                  (every critic regresses onto the same y)
        dQ_n = ∇_a Q̄(s, a_n),   Q̄ = (1/C) Σ_i Q_i                     (the field WPO's policy follows)

    C = 1 is the single-critic loss exactly (the min and the mean over one critic are the identity). Why
    the mean for ∇_a Q, not TD3's first critic (Fujimoto et al. 2018, Algorithm 1) nor SAC's min: WPO's
    update (Pfau et al. 2025, eq. 6) is unchanged, only its velocity field ∇_a Q is estimated; the mean
    treats both critics alike and averages their partly independent errors in ∇_a Q (the variance of
    the mean's error is at most the larger critic's), while ∇_a min_i Q_i is, at each action, the
    gradient of whichever critic is lower there, a field that jumps where the critics cross. The
    pessimism the twin critics exist for, against the overestimation that bootstrapping compounds
    (Fujimoto et al. 2018, section 4), is the target's min. The cost over TD3's choice is one more critic
    forward and backward pass on the N·B policy samples. ``critic_loss``, ``q_mean``, ``td_error_abs_mean``
    and the other critic statistics are the first critic's; with C = 2 also ``critic_2_loss`` and
    ``twin_q_abs_diff`` (mean_b |Q_1(s_b, a_b) − Q_2(s_b, a_b)|).
    """
    critics = tuple(critic) if isinstance(critic, Sequence) else (critic,)
    target_critics = tuple(target_critic) if isinstance(target_critic, Sequence) else (target_critic,)
    if not critics or len(critics) != len(target_critics):
        raise ValueError(f"wpo_loss: {len(critics)} critics and {len(target_critics)} target critics; "
                         "allowed: one target per critic, at least one critic")
    obs, action = batch["obs"].float(), batch["action"]
    boot_obs = batch["bootstrap_obs"].float()
    n_pol, n_tgt = s.num_action_samples, s.num_target_action_samples
    if s.critic_clip_actions:
        critics = tuple(_clip_input(c) for c in critics)
        target_critics = tuple(_clip_input(c) for c in target_critics)

    # Critic: n-step expected-SARSA target from the target networks (clipped double-Q with two critics).
    with torch.no_grad():
        t_mean, t_std = target_policy(boot_obs)
        next_actions = L.to_action(_sample(t_mean, t_std, n_tgt, generator), s.policy_bound)  # [M, B, D]
        boot = boot_obs.unsqueeze(0).expand(n_tgt, *boot_obs.shape)
        target_q = L.clipped_double_q(torch.stack([tc(boot, next_actions) for tc in target_critics]))  # [M, B]
        targets = L.expected_sarsa_targets(batch["nstep_return"], batch["bootstrap_discount"], target_q)
    qs = [c(obs, action) for c in critics]
    loss_q, stats_q = L.critic_loss(qs[0], targets)
    loss_critics = loss_q
    for i, q_i in enumerate(qs[1:], start=2):
        loss_i, _ = L.critic_loss(q_i, targets)
        loss_critics = loss_critics + loss_i
        stats_q[f"critic_{i}_loss"] = loss_i
    if len(qs) > 1:
        stats_q["twin_q_abs_diff"] = (qs[0] - qs[1]).detach().abs().mean()

    # Policy: WPO's loss with the Fisher-preconditioned Gaussian; sampled actions are constants.
    mean, std = policy(obs)
    with torch.no_grad():
        samples = _sample(mean, std, n_pol, generator)  # [N, B, D]: a, or u for tanh_squash
        actions = L.to_action(samples, s.policy_bound)
    actions.requires_grad_(True)
    with torch.enable_grad():
        obs_n = obs.unsqueeze(0).expand(n_pol, *obs.shape)
        q_n = torch.stack([c(obs_n, actions) for c in critics]).mean(0)  # Q̄ = (1/C) Σ_i Q_i
        grad_q = torch.autograd.grad(q_n.sum(), actions)[0]  # input gradient only: critic params untouched
    if s.action_penalty > 0.0:
        grad_q = grad_q + s.action_penalty * L.out_of_bounds_grad(actions.detach())
    if s.policy_bound == "tanh_squash":
        grad_q = L.tanh_squash_grad(samples, grad_q)  # ∇_u Q(s, tanh u): the flow runs in u-space
    if s.squash_grad_q == "cube_root":
        grad_q = L.cube_root(grad_q)
    mean_p, std_p = L.fisher_preconditioned(mean, std)
    loss_pi, stats_pi = L.wpo_policy_loss(L.gaussian_grad_log_prob(samples, mean_p, std_p), grad_q)

    # Decoupled KL to the target policy.
    with torch.no_grad():
        tm, ts = target_policy(obs)
    kl_m, kl_s = L.decoupled_gaussian_kl(tm, ts, mean, std)
    penalty, dual, stats_kl = L.kl_penalty(kl_m, kl_s, log_alpha_mean, log_alpha_std, s.epsilon_mean,
                                           s.epsilon_stddev)
    total = loss_critics + loss_pi + penalty
    if s.dual_learning:
        total = total + dual
    stats = dict(critic_loss=loss_q, policy_loss=loss_pi, kl_penalty=penalty, dual_loss=dual,
                 policy_std_mean=std.detach().mean(), policy_std_min=std.detach().min(),
                 policy_std_max=std.detach().max(), **L.mean_bound_stats(L.to_action(mean, s.policy_bound)),
                 q_value_sample_mean=q_n.detach().mean(), **stats_q, **stats_pi, **stats_kl)
    return total, stats


class WPOLearner(OffPolicyLearner):
    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        module = self.module[module_id].unwrapped()
        self.register_optimizer(module_id=module_id, optimizer_name="policy",
                                optimizer=adam(module.policy.parameters(), lr=config.policy_lr or config.lr),
                                params=list(module.policy.parameters()))
        critic_params = [p for critic in module.critics() for p in critic.parameters()]  # one or both critics
        self.register_optimizer(module_id=module_id, optimizer_name="critic",
                                optimizer=adam(critic_params, lr=config.critic_lr or config.lr), params=critic_params)
        duals = [module.log_alpha_mean, module.log_alpha_stddev]
        if config.dual_learning:
            self.register_optimizer(module_id=module_id, optimizer_name="dual",
                                    optimizer=adam(duals, lr=config.dual_lr), params=duals)
        else:
            for p in duals:
                p.requires_grad_(False)

    def compute_loss_for_module(self, *, module_id: str, config: Any = None, batch: dict[str, Tensor],
                                fwd_out: dict[str, Any]) -> Tensor:
        m = self.module[module_id].unwrapped()
        total, stats = wpo_loss(m.policy, m.critics(), m.target_policy, m.target_critics(), m.log_alpha_mean,
                                m.log_alpha_stddev, batch, WPOSettings.from_config(config), self.generator)
        self.record(module_id, **stats)
        return total

    def plasticity_probe_loss(self, module_id: str) -> Tensor:
        """The WPO loss on a fixed replay batch (for the plasticity diagnostic's Hessian), stats untouched."""
        saved_gen = self.generator.get_state()
        saved_stats = {k: dict(v) for k, v in self._stats.items()}
        index = torch.arange(min(len(self.replay), int(self.config.train_batch_size_per_learner)))
        batch = {f: t[index.to(t.device)] for f, t in self.replay.storage.items()}
        try:
            return self.compute_loss_for_module(module_id=module_id, config=self.config.get_config_for_module(module_id),
                                                batch=batch, fwd_out={})
        finally:
            self.generator.set_state(saved_gen)
            self._stats.clear()
            self._stats.update(saved_stats)

