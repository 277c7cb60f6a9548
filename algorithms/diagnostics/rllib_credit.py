"""Diagnostic ``credit``: the credit-assignment metrics of ``credit.py`` for RLlib algorithms.

Spec: ``diagnostics: {credit: {every: 10, episodes: 4}}`` (see :class:`CreditSettings`). Every
``every`` iterations, inside the learner (``learner_group.foreach_learner``, so the learner's full
module with its value function / critic is used; with several learners the first one's numbers are
reported):

1. ``episodes`` episodes are sampled with the learner's current policy (stochastic actions when
   ``explore``) in a fresh copy of the trial's env built as RLlib builds it; episode k is reset with
   seed ``seed + k`` (seed: the setting, else the algorithm's, else 0) and sampled under a forked torch
   RNG, so the same weights give the same episodes and training randomness is untouched;
2. the learner's estimates on them, by module kind (:func:`module_kind`):
   ``v``: ValueFunctionAPI modules (PPO): u_t = V(s_t); advantage = GAE(γ, λ);
   ``q_discrete``: Q(s, ·) for all actions (RLlib's QNetAPI, DQN and discrete SAC; our EVE's
   ``q_values``): u_t = Q(s_t, a_t), advantage = Q(s_t, a_t) − max_a Q(s_t, a), action influence =
   max_a Q − min_a Q;
   ``q_continuous``: Q(s, a) of a continuous critic (SAC's ``compute_q_values``, our WPO's ``critic``):
   u_t = Q(s_t, a_t), advantage = Q(s_t, a_t) − Q(s_t, a*(s_t)) with a* the deterministic policy
   action (the distribution's mode / the policy mean), action influence = ‖∇_a Q(s_t, a_t)‖₂;
3. :func:`algorithms.diagnostics.credit.credit_metrics` turns them into ``credit/...`` keys
   (definitions and key list there). γ is the algorithm's ``gamma`` and λ its ``lambda_`` (PPO's GAE
   λ) unless the settings give them.

bsuite: with ``bsuite: true`` (default) and no ``bsuite`` diagnostic enabled in the same trial, this
callback also runs the ``bsuite`` diagnostic's callback (:mod:`algorithms.diagnostics.rllib_bsuite`,
``stop_when_finished`` off) so bsuite ids report ``credit/bsuite_score`` and their per-setting
regrets; on other envs that part does nothing.

Also reported: ``credit/compute_s`` (seconds spent this iteration) and ``credit/episode_return_mean``
of the diagnostic's own episodes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from algorithms.diagnostics import credit as C
from algorithms.diagnostics.registry import register_diagnostic

PREFIX = C.PREFIX
MODULE_KINDS = ("v", "q_discrete", "q_continuous")


class CreditSettings(BaseModel):
    """Settings of diagnostic ``credit`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(10, ge=1)
    """Compute every K training iterations (iterations K, 2K, ...)."""
    episodes: int = Field(4, ge=1)
    """Episodes sampled per computation."""
    max_episode_steps: int = Field(1000, ge=1)
    """Cut an episode after this many steps (treated as truncated: bootstrapped with u_T)."""
    explore: bool = True
    """Sample actions from the policy (True) or take its deterministic action (False)."""
    gamma: float | None = Field(None, ge=0, le=1)
    """Discount γ (default: the algorithm's ``gamma``, else 0.99)."""
    gae_lambda: float | None = Field(None, ge=0, le=1)
    """GAE λ of V learners' advantages (default: the algorithm's ``lambda_``, else 0.95)."""
    delay_edges: list[int] = Field(default_factory=lambda: list(C.DEFAULT_DELAY_EDGES))
    """Lower edges of the delay bins (start at 0, strictly increasing)."""
    seed: int | None = None
    """Reset seed of the first episode (default: the algorithm's seed, else 0)."""
    bsuite: bool = True
    """Score bsuite episodes (through the ``bsuite`` diagnostic's callback) when that diagnostic is off."""

    @field_validator("delay_edges")
    @classmethod
    def _edges(cls, v: list[int]) -> list[int]:
        C.delay_bin_labels(v)
        return v


# ---------------------------------------------------------------------------------------------------
# RLModule adapters (torch only): actions and value estimates for any module kind


def module_kind(module: Any, action_space: gym.Space) -> str | None:
    """``v`` | ``q_discrete`` | ``q_continuous`` (see module docstring), or None when the module has neither."""
    from ray.rllib.core.rl_module.apis import QNetAPI, ValueFunctionAPI

    discrete = isinstance(action_space, gym.spaces.Discrete)
    if isinstance(module, ValueFunctionAPI):
        return "v"
    if hasattr(module, "q_values") and discrete:
        return "q_discrete"
    if hasattr(module, "critic") and isinstance(action_space, gym.spaces.Box):
        return "q_continuous"
    if isinstance(module, QNetAPI):
        return "q_discrete" if discrete else "q_continuous"
    return None


def q_all(module: Any, obs: Tensor) -> Tensor:
    """Q(s, ·) [T, A] of a discrete action-value module."""
    from ray.rllib.core.columns import Columns

    if hasattr(module, "q_values"):
        return module.q_values(obs)
    try:
        out = module.compute_q_values({Columns.OBS: obs}, squeeze=False)  # SAC (discrete)
    except TypeError:
        out = module.compute_q_values({Columns.OBS: obs})  # DQN
    return out["qf_preds"] if isinstance(out, Mapping) else out


def q_sa(module: Any, obs: Tensor, actions: Tensor) -> Tensor:
    """Q(s, a) [T] of a continuous action-value module (WPO's critic, SAC's compute_q_values)."""
    from ray.rllib.core.columns import Columns

    if hasattr(module, "critic"):
        return module.critic(obs.float(), actions.float())
    out = module.compute_q_values({Columns.OBS: obs, Columns.ACTIONS: actions})
    return (out["qf_preds"] if isinstance(out, Mapping) else out).reshape(-1)


def policy_actions(module: Any, obs: Tensor, *, explore: bool, generator: torch.Generator | None = None) -> Tensor:
    """Actions [T, ...] of the module's policy: sampled when ``explore``, else deterministic.

    Our off-policy modules: ``module.act``. RLlib modules: ``forward_exploration`` / ``forward_inference``;
    their ``actions`` output if present (DQN), else a sample (or the mode) of the action distribution
    built from ``action_dist_inputs``.
    """
    from ray.rllib.core.columns import Columns

    with torch.no_grad():
        if hasattr(module, "act"):
            return module.act(obs, explore=explore, generator=generator)
        batch = {Columns.OBS: obs}
        out = None
        if explore:
            try:
                out = module.forward_exploration(batch)
            except TypeError:  # DQN's exploration needs a timestep: fall back to its greedy action
                out = None
        if out is None:
            out = module.forward_inference(batch)
        if Columns.ACTIONS in out:
            return out[Columns.ACTIONS]
        cls = module.get_exploration_action_dist_cls() if explore else module.get_inference_action_dist_cls()
        dist = cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
        return (dist if explore else dist.to_deterministic()).sample()


def episode_estimates(module: Any, kind: str, obs: Tensor, actions: Tensor, final_obs: Tensor
                      ) -> tuple[np.ndarray, float, np.ndarray | None, np.ndarray | None]:
    """(u [T], u_T, advantages [T] or None, action influence [T] or None) for one episode (module docstring)."""
    from ray.rllib.core.columns import Columns

    all_obs = torch.cat([obs, final_obs[None]], 0)
    with torch.no_grad():
        if kind == "v":
            v = module.compute_values({Columns.OBS: all_obs}).reshape(-1).double().cpu().numpy()
            return v[:-1], float(v[-1]), None, None
        if kind == "q_discrete":
            q = q_all(module, all_obs).double()
            idx = actions.long().reshape(-1)
            u = q[:-1].gather(1, idx[:, None]).squeeze(1)
            adv = u - q[:-1].max(1).values
            return (u.cpu().numpy(), float(q[-1].max()), adv.cpu().numpy(), C.action_spread(q[:-1]))
        if kind == "q_continuous":
            det = policy_actions(module, all_obs, explore=False)
            u = q_sa(module, obs, actions).double()
            u_det = q_sa(module, all_obs, det).double()
            infl = C.action_gradient_norm(lambda s, a: q_sa(module, s, a), obs, actions)
            return u.cpu().numpy(), float(u_det[-1]), (u - u_det[:-1]).cpu().numpy(), infl
    raise ValueError(f"module kind {kind!r}; allowed: {list(MODULE_KINDS)}")


def _env_action_fn(config: Any, space: gym.Space):
    from algorithms.offpolicy.env_runner import _action_mapper

    return _action_mapper(space, bool(getattr(config, "normalize_actions", False)), True)


def sample_credit_episodes(module: Any, env: gym.Env, config: Any, settings: CreditSettings, seed: int
                           ) -> tuple[list[C.CreditEpisode], list[float]]:
    """Sample ``settings.episodes`` episodes with ``module`` in ``env``; estimates attached (module docstring)."""
    kind = module_kind(module, env.action_space)
    if kind is None:
        raise ValueError(f"credit: module {type(module).__name__} has neither a value function nor a Q function")
    to_env = _env_action_fn(config, env.action_space)
    device = next(module.parameters()).device
    episodes, returns = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        for k in range(settings.episodes):
            o, _ = env.reset(seed=seed + k)
            obs, acts, rews = [], [], []
            terminated = False
            for _ in range(settings.max_episode_steps):
                x = torch.as_tensor(np.asarray(o, dtype=np.float32)[None], device=device)
                a = policy_actions(module, x, explore=settings.explore, generator=gen)[0]
                o2, r, terminated, truncated, _ = env.step(to_env(a.cpu().numpy()))
                obs.append(np.asarray(o, dtype=np.float32))
                acts.append(a.cpu())
                rews.append(float(r))
                o = o2
                if terminated or truncated:
                    break
            obs_t = torch.as_tensor(np.stack(obs), device=device)
            act_t = torch.stack(acts).to(device)
            final = torch.as_tensor(np.asarray(o, dtype=np.float32), device=device)
            u, u_T, adv, infl = episode_estimates(module, kind, obs_t, act_t, final)
            episodes.append(C.CreditEpisode(np.array(rews), u, u_T, bool(terminated), adv, infl))
            returns.append(float(sum(rews)))
    return episodes, returns


def learner_credit_metrics(learner: Any, *, settings: dict, seed: int) -> dict[str, float]:
    """Runs inside a Learner: sample episodes with its first module and compute ``credit/...`` metrics."""
    from algorithms.diagnostics.probe import make_env_from_algorithm_config

    s = CreditSettings(**settings)
    config = learner.config
    module_id = next(iter(learner.module.keys()))
    rl_module = learner.module[module_id]
    module = rl_module.unwrapped() if hasattr(rl_module, "unwrapped") else rl_module
    gamma = s.gamma if s.gamma is not None else float(getattr(config, "gamma", 0.99) or 0.99)
    lam = s.gae_lambda if s.gae_lambda is not None else float(getattr(config, "lambda_", 0.95) or 0.95)
    env = make_env_from_algorithm_config(config)
    was_training = module.training
    module.eval()
    try:
        episodes, returns = sample_credit_episodes(module, env, config, s, seed)
    finally:
        module.train(was_training)
        env.close()
    out = C.credit_metrics(episodes, gamma, lam, s.delay_edges)
    out[f"{PREFIX}/episode_return_mean"] = float(np.mean(returns))
    return out


# ---------------------------------------------------------------------------------------------------
# RLlib callback


def _other_bsuite_callback(config: Any) -> bool:
    classes = getattr(config, "callbacks_class", None)
    classes = classes if isinstance(classes, list | tuple) else [classes]
    return any(getattr(c, "__name__", "") == "BsuiteCallback" for c in classes)


def make_credit_callback(settings: CreditSettings | Mapping[str, Any] | None = None) -> type:
    """An RLlibCallback subclass reporting ``credit/...`` with these settings (registry factory)."""
    from ray.rllib.callbacks.callbacks import RLlibCallback

    if not isinstance(settings, CreditSettings):
        settings = CreditSettings(**(settings or {}))
    s = settings

    class CreditCallback(RLlibCallback):
        """See algorithms.diagnostics.rllib_credit."""

        def __init__(self) -> None:
            super().__init__()
            self._bsuite = None
            if s.bsuite:
                from algorithms.diagnostics.rllib_bsuite import BsuiteSettings, make_bsuite_callback

                self._bsuite = make_bsuite_callback(BsuiteSettings(stop_when_finished=False))()

        def _bsuite_for(self, config: Any) -> Any:
            return None if self._bsuite is None or _other_bsuite_callback(config) else self._bsuite

        def on_algorithm_init(self, *, algorithm: Any, **kwargs: Any) -> None:
            b = self._bsuite_for(algorithm.config)
            if b is not None:
                b.on_algorithm_init(algorithm=algorithm, **kwargs)

        def on_episode_end(self, *, env_runner: Any = None, **kwargs: Any) -> None:
            b = self._bsuite_for(env_runner.config) if env_runner is not None else None
            if b is not None:
                b.on_episode_end(env_runner=env_runner, **kwargs)

        def on_train_result(self, *, algorithm: Any, result: dict, **kwargs: Any) -> None:
            b = self._bsuite_for(algorithm.config)
            if b is not None:
                b.on_train_result(algorithm=algorithm, result=result, **kwargs)
            iteration = int(result.get("training_iteration", algorithm.iteration))
            if iteration % s.every != 0:
                return
            t0 = time.perf_counter()
            seed = s.seed if s.seed is not None else int(algorithm.config.seed or 0)
            results = algorithm.learner_group.foreach_learner(learner_credit_metrics, settings=s.model_dump(),
                                                              seed=seed)
            first: dict[str, float] = {}
            for r in results:
                if not r.ok:
                    raise r.get()
                first = r.get()
                break
            for key, value in first.items():
                result[key] = float(value)
            result[f"{PREFIX}/compute_s"] = time.perf_counter() - t0

    return CreditCallback


register_diagnostic("credit", CreditSettings, rllib_callback=make_credit_callback)
