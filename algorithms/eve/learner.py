"""EVELearner: Q-learning on the return density, the running diagonal Fisher, and the epistemic std of Q.

Per update (``compute_loss_for_module``), on a replay batch of B transitions:

1. one forward pass Q_θ(s_b, ·) (hooked, so the same pass also gives the per-example gradients);
2. targets G_b = R_b + d_b · Q_targ(s'_b, argmax_a Q_θ(s'_b, a)) (double Q; ``double_q``) from the
   replay's n-step fields, and the loss −log N(G; Q_θ(s, a), σ²) (:func:`losses.return_density_nll`);
3. with exploration="posterior": the batch Fisher f_t = Σ_b (∇_θQ_θ(s_b, a_b))² / (B σ²) at the current
   θ (:func:`losses.linear_squared_gradient_sum`), folded into the running estimate
   (:class:`algorithms.uncertainty.RunningDiagonalFisher`, EMA), and written with N = transitions
   inserted into the module's buffers ``fisher_diag`` and ``num_data`` (they reach the env runners with
   the weights).

With ``target_sampling`` (and exploration="posterior") each update bootstraps from a linearised posterior
sample of the target network, Q̃(s', a) = Q_targ(s', a) + ∇_θQ_targ(s', a)ᵀ δ with δ = (N·diag F + λ)^{-1/2} ⊙ ε
(ε from the learner's seeded generator; :func:`losses.linearised_q_sample`): zero-mean noise whose variance
is the Delta Variance of Q(s', a), so G = r + γ max_a Q̃(s', a) is optimistic by about the epistemic std
of the next state, and Q-learning carries that uncertainty back along trajectories (as randomised value
functions do, Osband et al. 2016). Perturbing the target network's weights directly instead shifts the
mean of a ReLU network's output as well, which on deep_sea made the targets pessimistic.

``uncertainty_stats()`` (once per iteration): the epistemic std of Q, sqrt(∇_θQᵀ (N·diag F + λ)⁻¹ ∇_θQ)
(a Delta Variance) on ``uncertainty_batch_size`` replay states at their greedy action, and the
posterior std summary.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from torch import Tensor

from algorithms.eve.losses import (
    linear_squared_gradient_sum,
    linearised_q_sample,
    nstep_q_targets,
    posterior_std_stats,
    q_epistemic_variance,
    q_gradients,
    q_value_stats,
    return_density_nll,
)
from algorithms.offpolicy.learner import OffPolicyLearner
from algorithms.uncertainty import RunningDiagonalFisher, module_fn, module_params

FISHER_STATE = "eve_fisher"


class EVELearner(OffPolicyLearner):
    """Loss, Fisher and uncertainty of EVE on the off-policy core (see the module docstring)."""

    def build(self) -> None:
        super().build()
        cfg = self.config
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        self.fisher = RunningDiagonalFisher(
            module_params(module.q), damping=float(cfg.prior_precision), mode="ema",
            decay=float(cfg.fisher_decay), noise_var=float(cfg.noise_var)).to(module.fisher_diag.device)
        self.track_posterior = cfg.exploration == "posterior"

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> Tensor:
        module = self.module[module_id].unwrapped()
        obs, actions = batch["obs"].float(), batch["action"].long()
        if self.track_posterior:
            sq_sum, q = linear_squared_gradient_sum(module.q, obs, actions)
            # RunningDiagonalFisher.update squares and averages its rows: one row sqrt(Σ_b g_b² / B)
            # gives exactly f_t = Σ_b g_b² / (B σ²).
            self.fisher.update((sq_sum.detach() / obs.shape[0]).sqrt().unsqueeze(0))
            module.fisher_diag.copy_(self.fisher.fisher)
            module.num_data.fill_(float(self.replay.num_transitions))
        else:
            q = module.q(obs)
        q_taken = q.gather(1, actions.unsqueeze(1)).squeeze(1)
        boot = batch["bootstrap_obs"].float()
        if self.track_posterior and config.target_sampling:
            std = self.fisher.covariance(float(self.replay.num_transitions)).sqrt()
            eps = torch.randn(std.shape, generator=self.generator, device=self.generator.device).to(std)
            next_target = linearised_q_sample(module.target_q, boot, float(config.posterior_scale) * std * eps)
        else:
            with torch.no_grad():
                next_target = module.target_q(boot)
        with torch.no_grad():
            next_online = module.q(boot) if config.double_q else None
            targets = nstep_q_targets(batch["nstep_return"], batch["bootstrap_discount"], next_target, next_online)
        loss, stats = return_density_nll(q_taken, targets, float(config.noise_var))
        self.record(module_id, **stats, **q_value_stats(q.detach()))
        return loss

    def uncertainty_stats(self) -> dict[str, float]:
        """Epistemic std of Q (Delta Variance) on replay states and the posterior std summary."""
        if not self.track_posterior or len(self.replay) == 0:
            return {}
        cfg = self.config
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        batch = self.replay.sample(int(cfg.uncertainty_batch_size))
        obs = batch["obs"].float()
        params = module_params(module.q)
        cov = self.fisher.covariance(float(self.replay.num_transitions))
        with torch.no_grad():
            greedy = module.q(obs).argmax(dim=1)
        grads = q_gradients(module_fn(module.q), params, obs, greedy)
        std = q_epistemic_variance(grads, cov, params).clamp_min(0).sqrt()
        out = {"q_epistemic_std": std.mean(), "q_epistemic_std_max": std.max(), "q_epistemic_std_min": std.min()}
        out.update(posterior_std_stats(cov))
        out["fisher_mean"] = self.fisher.fisher.mean()
        result = {k: float(v) for k, v in out.items()}
        result["num_data"] = float(self.replay.num_transitions)
        return result

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(FISHER_STATE, components, not_components):
            state[FISHER_STATE] = self.fisher.state_dict()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        if FISHER_STATE in state:
            self.fisher.load_state_dict(state[FISHER_STATE])
