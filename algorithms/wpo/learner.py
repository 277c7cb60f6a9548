"""WPOLearner: the WPO losses of ``losses.py`` on replay batches (one update = one call of the loss).

Per batch of B transitions (REFERENCE.md, WPO):
- critic: y = R^(n) + γ^{n'}(1 − term)·mean_m Q_targ(s', a'_m), a'_m ~ π_targ(·|s') (M samples);
  loss 0.5·(y − Q(s, a))², actions fed to the critic unclipped;
- policy: a_n ~ π(·|s) (N samples, constants), dQ_n = ∇_a Q(s, a_n) from the online critic (detached),
  loss −mean_b Σ_n Σ_d ∇_a log π'(a_n|s)·dQ_n with π' the Fisher-preconditioned Gaussian; no state in a
  replay batch is terminal (s_t always had an action taken), so the mask is all ones;
- decoupled KL penalty to the target policy, α fixed unless ``dual_learning``.
Optimisers: Adam for the policy, Adam for the critic (each clipped to ``grad_clip``), Adam for log α
when ``dual_learning``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from algorithms.offpolicy.learner import OffPolicyLearner
from algorithms.wpo import losses as L


class WPOLearner(OffPolicyLearner):
    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        module = self.module[module_id].unwrapped()
        self.register_optimizer(module_id=module_id, optimizer_name="policy",
                                optimizer=torch.optim.Adam(module.policy.parameters(), lr=config.policy_lr or config.lr),
                                params=list(module.policy.parameters()))
        self.register_optimizer(module_id=module_id, optimizer_name="critic",
                                optimizer=torch.optim.Adam(module.critic.parameters(), lr=config.critic_lr or config.lr),
                                params=list(module.critic.parameters()))
        duals = [module.log_alpha_mean, module.log_alpha_stddev]
        if config.dual_learning:
            self.register_optimizer(module_id=module_id, optimizer_name="dual",
                                    optimizer=torch.optim.Adam(duals, lr=config.dual_lr), params=duals)
        else:
            for p in duals:
                p.requires_grad_(False)

    def _sample(self, mean: Tensor, std: Tensor, n: int) -> Tensor:
        noise = torch.randn((n,) + tuple(mean.shape), generator=self.generator, device=mean.device, dtype=mean.dtype)
        return mean.unsqueeze(0) + std.unsqueeze(0) * noise

    def compute_loss_for_module(self, *, module_id: str, config: Any = None, batch: dict[str, Tensor],
                                fwd_out: dict[str, Any]) -> Tensor:
        m = self.module[module_id].unwrapped()
        obs, action = batch["obs"].float(), batch["action"]
        boot_obs = batch["bootstrap_obs"].float()
        n_pol, n_tgt = int(config.num_action_samples), int(config.num_target_action_samples)

        # Critic: n-step expected-SARSA target from the target networks.
        with torch.no_grad():
            t_mean, t_std = m.target_policy(boot_obs)
            next_actions = self._sample(t_mean, t_std, n_tgt)  # [M, B, D]
            target_q = m.target_critic(boot_obs.unsqueeze(0).expand(n_tgt, *boot_obs.shape), next_actions)
            targets = L.expected_sarsa_targets(batch["nstep_return"], batch["bootstrap_discount"], target_q)
        q = m.critic(obs, action)
        loss_q, stats_q = L.critic_loss(q, targets)

        # Policy: WPO's loss with the Fisher-preconditioned Gaussian.
        mean, std = m.policy(obs)
        with torch.no_grad():
            actions = self._sample(mean, std, n_pol)  # [N, B, D] constants
        actions.requires_grad_(True)
        obs_n = obs.unsqueeze(0).expand(n_pol, *obs.shape)
        with torch.enable_grad():
            q_n = m.critic(obs_n, actions)
            grad_q = torch.autograd.grad(q_n.sum(), actions)[0]
        if config.squash_grad_q == "cube_root":
            grad_q = L.cube_root(grad_q)
        mean_p, std_p = L.fisher_preconditioned(mean, std)
        grad_log_prob = L.gaussian_grad_log_prob(actions, mean_p, std_p)
        loss_pi, stats_pi = L.wpo_policy_loss(grad_log_prob, grad_q)

        # Decoupled KL to the target policy.
        with torch.no_grad():
            tm, ts = m.target_policy(obs)
        kl_m, kl_s = L.decoupled_gaussian_kl(tm, ts, mean, std)
        penalty, dual, stats_kl = L.kl_penalty(kl_m, kl_s, m.log_alpha_mean, m.log_alpha_stddev,
                                               float(config.epsilon_mean), float(config.epsilon_stddev))
        total = loss_q + loss_pi + penalty
        if config.dual_learning:
            total = total + dual
        self.record(module_id, critic_loss=loss_q, policy_loss=loss_pi, kl_penalty=penalty, dual_loss=dual,
                    policy_std_mean=std.detach().mean(), policy_std_min=std.detach().min(),
                    policy_std_max=std.detach().max(), policy_mean_abs=mean.detach().abs().mean(),
                    q_value_sample_mean=q_n.detach().mean(), **stats_q, **stats_pi, **stats_kl)
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

