"""EVELearner: Q-learning on the return density, the running diagonal Fisher, and the epistemic std of Q.

Per update (``compute_loss_for_module``), on a replay batch of B transitions:

1. one forward pass Q_θ(s_b, ·) (hooked, so the same pass also gives the per-example gradients);
2. targets G_b = R_b + d_b · Q_targ(s'_b, argmax_a Q_θ(s'_b, a)) (double Q; ``double_q``) from the
   replay's n-step fields, and the loss −log N(G; Q_θ(s, a), σ²) (:func:`losses.return_density_nll`);
3. with exploration="posterior": the batch Fisher f_t = Σ_b (∇_θQ_θ(s_b, a_b))² / (B σ²) at the current
   θ (:func:`algorithms.uncertainty.fast.mean_sq_grad_fast_and_vjp_selected`: one reverse pass of
   Σ_b Q_θ(s_b, a_b) on the same forward pass, by hand for MLPs, gives the Fisher and, by the per-layer
   identities, the loss gradient Σ_b ∂L/∂Q_b ∇_θQ_b, so no autograd graph and no second backward pass),
   folded into the running estimate
   (:class:`algorithms.uncertainty.RunningDiagonalFisher`, EMA), and written with N = transitions
   inserted into the module's buffers ``fisher_diag`` and ``num_data`` (they reach the env runners with
   the weights).

With ``target_sampling`` (and exploration="posterior") each update bootstraps from a linearised posterior
sample of the Q-function, drawn per update: δ = (N·diag F + λ)^{-1/2} ⊙ ε (ε from the learner's seeded
generator) perturbs the target network's values, Q̃_targ(s', a) = Q_targ(s', a) + ∇_θQ_targ(s', a)ᵀ δ
(:func:`losses.linearised_q_perturbation`; targets by :func:`losses.sampled_q_targets`, each ∇_θQ_targᵀδ
clipped to ±``target_noise_clip``), and, with ``target_argmax="sample"`` (default), the same draw
perturbs the online values that pick the bootstrap action under double Q-learning,
a* = argmax_a [Q_θ(s', a) + ∇_θQ_targ(s', a)ᵀ δ]. The target is then the Q-learning target of one posterior
sample of Q, G = r + γ Q̃_targ(s', a*), whose mean is above r + γ Q_targ(s', argmax_a Q_θ(s', a)) by about the
epistemic std of the next state's action values (the expected maximum of the sampled values); Q-learning
carries that optimism back along trajectories, so the mean Q prefers actions leading to less-known states
(as the targets of randomised value functions and bootstrapped ensembles do, Osband et al. 2016, 2018).
Why this is the default: with ``target_argmax="mean"`` (the action picked by Q_θ alone) the target noise
has mean zero, no uncertainty reaches the Q values of well-visited states, and acting there is decided by
learning noise: on deep_sea-10 seed 1 the first state's action gap settled at -0.017 ± 0.015 (posterior
std) with the reward found once, and the run failed; with "sample" seeds 0, 1, 2 solve it (benchmarks/README.md, EVE).
A diagonal posterior gives each rarely visited input its own independent noise but no correlation along
a chain of states, so the per-episode samples alone do not explore deeply; the propagated optimism does.
Perturbing the target network's weights directly instead shifts the mean of a ReLU network's output as
well, which on deep_sea made the targets pessimistic.

``uncertainty_stats()`` (once per iteration): the epistemic std of Q, sqrt(∇_θQᵀ (N·diag F + λ)⁻¹ ∇_θQ)
(a Delta Variance) on ``uncertainty_batch_size`` replay states at their greedy action, and the
posterior std summary.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from torch import Tensor
from torch.func import functional_call

from algorithms.eve.losses import (
    linearised_q_perturbation,
    nstep_q_targets,
    posterior_std_stats,
    q_epistemic_variance,
    q_gradients,
    q_value_stats,
    return_density_nll,
    sampled_q_targets,
)
from algorithms.offpolicy.learner import OffPolicyLearner
from algorithms.uncertainty import RunningDiagonalFisher, module_fn, module_params
from algorithms.uncertainty.fast import mean_sq_grad_fast_and_vjp_selected

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
        # With posterior tracking, the loss gradient comes from the Fisher's own backward pass (same values as
        # loss.backward(), tested; one backward pass per update instead of two). False: autograd's backward.
        self.hand_gradients = True
        self._hand_grads: dict[str, dict[str, Tensor]] = {}

    def compute_loss_for_module(self, *, module_id: str, config: Any, batch: dict[str, Any],
                                fwd_out: dict[str, Any]) -> Tensor:
        module = self.module[module_id].unwrapped()
        obs, actions = batch["obs"].float(), batch["action"].long()
        vjp = None
        if self.track_posterior:
            # One forward and one backward pass serve the Fisher and the loss gradient: Q_θ(s, ·) is captured,
            # the backward pass of Σ_b Q_θ(s_b, a_b) gives per layer the squared per-example gradients' sums
            # (the Fisher) and, once the targets are known, the loss gradient Σ_b ∂L/∂Q_b ∇_θQ_b (``vjp``).
            captured: dict[str, Tensor] = {}

            def q_taken_fn(net: torch.nn.Module) -> Tensor:
                captured["q"] = net(obs)
                return captured["q"].gather(1, actions.unsqueeze(1)).squeeze(1)

            if self.hand_gradients:  # MLPs: a hand-written reverse pass, no autograd graph (uncertainty.fast)
                q, mean_sq, batch_size, vjp = mean_sq_grad_fast_and_vjp_selected(module.q, obs, actions)
                fisher = self.fisher.update_mean_sq_grad(mean_sq, batch_size)
            else:
                fisher = self.fisher.update_from_module(module.q, q_taken_fn, retain_graph=True)
                q = captured["q"]
            module.fisher_diag.copy_(fisher)
            module.num_data.fill_(float(self.replay.num_transitions))
        else:
            q = module.q(obs)
            boot = batch["bootstrap_obs"].float()
            with torch.no_grad():
                next_online = module.q(boot) if config.double_q else None
                next_target = module.target_q(boot)
            loss, stats = _q_learning_loss(q, next_online, next_target, batch, config)
            self.record(module_id, **stats)
            return loss
        q_taken = q.gather(1, actions.unsqueeze(1)).squeeze(1)
        boot = batch["bootstrap_obs"].float()
        with torch.no_grad():
            next_online = module.q(boot) if config.double_q else None
        if config.target_sampling:
            std = self.fisher.posterior_std(float(self.replay.num_transitions))
            delta = torch.randn(std.shape, generator=self.generator, device=self.generator.device).to(std).mul_(std)
            if float(config.posterior_scale) != 1.0:
                delta.mul_(float(config.posterior_scale))
            q_targ, noise = linearised_q_perturbation(module.target_q, boot, delta)
            targets = sampled_q_targets(batch["nstep_return"], batch["bootstrap_discount"], q_targ, noise,
                                        next_online, argmax=config.target_argmax,
                                        noise_clip=config.target_noise_clip)
        else:
            with torch.no_grad():
                next_target = module.target_q(boot)
            targets = nstep_q_targets(batch["nstep_return"], batch["bootstrap_discount"], next_target, next_online)
        loss, stats = return_density_nll(q_taken, targets, float(config.noise_var))
        if vjp is not None:  # ∂L/∂Q_b = (Q_b − G_b) / (σ² B) for return_density_nll's L
            self._hand_grads[module_id] = vjp((q_taken - targets) / (float(config.noise_var) * q_taken.shape[0]))
        self.record(module_id, **stats, **q_value_stats(q.detach()))
        return loss

    # -- vectorised losses of seed packs (algorithms.offpolicy.packing) ---------------------------------------
    VECTORISED_BATCH_KEYS = ("obs", "action", "nstep_return", "bootstrap_obs", "bootstrap_discount")

    def supports_vectorised_losses(self) -> bool:
        """Without posterior tracking (exploration "epsilon_greedy" / "greedy": the Q-learner) the loss is a
        pure function of (θ, θ_targ, batch) (:meth:`functional_loss`) and Q has no buffers; the posterior's
        Fisher pass and its per-update target sample are not vectorised."""
        module = self.module[DEFAULT_MODULE_ID].unwrapped()
        return not self.track_posterior and next(iter(module.q.buffers()), None) is None

    def functional_loss(self, *, module_id: str, config: Any, params: dict[str, Tensor],
                        batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and statistics of ``compute_loss_for_module`` (exploration without posterior) for one
        replica's parameters: ``params`` maps the module's ``named_parameters()`` names (``q.*`` and
        ``target_q.*``) to tensors, run through this module's networks with ``torch.func.functional_call``,
        so ``torch.func.vmap`` over a leading replica axis of ``params`` and ``batch`` gives K replicas'
        losses in one call. Same operations as the per-replica path (:func:`_q_learning_loss`)."""
        module = self.module[module_id].unwrapped()
        online = {n[2:]: v for n, v in params.items() if n.startswith("q.")}
        target = {n[9:]: v for n, v in params.items() if n.startswith("target_q.")}
        q = functional_call(module.q, online, (batch["obs"].float(),))
        boot = batch["bootstrap_obs"].float()
        next_online = functional_call(module.q, online, (boot,)).detach() if config.double_q else None
        next_target = functional_call(module.target_q, target, (boot,)).detach()
        return _q_learning_loss(q, next_online, next_target, batch, config)

    def compute_gradients(self, loss_per_module: dict[str, Tensor], **kwargs: Any) -> dict[Any, Tensor]:
        """The loss gradient computed with the Fisher (``hand_gradients``), else RLlib's ``loss.backward()``."""
        if not self._hand_grads:
            return super().compute_gradients(loss_per_module, **kwargs)
        for optim in self._optimizer_parameters:
            optim.zero_grad(set_to_none=True)
        for module_id, grads in self._hand_grads.items():
            named = dict(self.module[module_id].unwrapped().q.named_parameters())
            for name, grad in grads.items():
                named[name].grad = grad
        self._hand_grads = {}
        return {pid: p.grad for pid, p in self._params.items()}

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


def _q_learning_loss(q: Tensor, next_online: Tensor | None, next_target: Tensor, batch: dict[str, Tensor],
                     config: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and statistics of one batch without posterior tracking: Q_θ(s_b, ·) ``q`` [B, A] (with a graph to
    θ), the detached Q_θ(s'_b, ·) (double Q; None: plain Q-learning) and Q_targ(s'_b, ·) [B, A];
    G_b = R_b + d_b · Q_targ(s'_b, a*_b) (:func:`losses.nstep_q_targets`) and
    L = mean_b (G_b − Q_θ(s_b, a_b))² / (2σ²) + ½ log(2πσ²) (:func:`losses.return_density_nll`). Shared by
    ``compute_loss_for_module`` and the vectorised ``functional_loss``, so both compute the same values."""
    q_taken = q.gather(1, batch["action"].long().unsqueeze(1)).squeeze(1)
    targets = nstep_q_targets(batch["nstep_return"], batch["bootstrap_discount"], next_target, next_online)
    loss, stats = return_density_nll(q_taken, targets, float(config.noise_var))
    return loss, {**stats, **q_value_stats(q.detach())}
