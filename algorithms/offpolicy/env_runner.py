"""VectorEnvRunner: an RLlib EnvRunner that steps E gymnasium envs and returns numpy arrays.

Why not RLlib's SingleAgentEnvRunner: it builds episode objects and runs connector pipelines per
step, and the learner then rebuilds train batches from those episodes in Python; for small
off-policy updates that bookkeeping, not the maths, set the pace. This runner is still a
real RLlib EnvRunner (created by EnvRunnerGroup locally or as remote actors, weights synced with
``EnvRunnerGroup.sync_weights``, metrics under ``env_runners/...``, Checkpointable), but ``sample``
returns a dict of arrays [T, E, ...]: ``obs, action, reward, next_obs, terminated, truncated`` with
``next_obs`` the true s_{t+1} (the final observation at an episode's end; envs are reset by the
runner right after it).

Reproducibility: episode k of env e on runner w is reset with seed
``SeedSequence([seed, w, e, k])``; actions come from ``module.act`` with the runner's own
``torch.Generator``. The runner's state holds, per env, the actions of the episode in progress, so a
restored runner rebuilds each env exactly by resetting with the episode's seed and replaying them
(deterministic envs), and training continues as if uninterrupted.

Hooks for subclasses (e.g. EVE's per-episode parameter perturbation):
- ``on_episode_start(env_indices)``: after envs in ``env_indices`` were reset (all of them at start).
- ``on_weights_set()``: after new module weights arrived.
- ``compute_actions(obs, explore)``: override to change how actions are chosen (default
  ``module.act``). Extra state to checkpoint: ``extra_state()`` / ``set_extra_state(state)``.
- ``supports_packed_actions()``, ``action_network()``, ``packed_actions(runners, explore, forward)``: one
  action pass for the runners of a seed pack (algorithms/offpolicy/packing.py), equal to each runner's own
  ``compute_actions``; ``sample`` is ``begin_sample``, ``step_envs`` per vector step, ``end_sample``, the
  phases the pack runs for all its runners (override ``end_sample`` for per-call work).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.env import INPUT_ENV_SINGLE_SPACES, INPUT_ENV_SPACES
from ray.rllib.env.env_context import EnvContext
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import (
    EPISODE_LEN_MAX,
    EPISODE_LEN_MEAN,
    EPISODE_LEN_MIN,
    EPISODE_RETURN_MAX,
    EPISODE_RETURN_MEAN,
    EPISODE_RETURN_MIN,
    NUM_ENV_STEPS_SAMPLED,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_EPISODES,
    NUM_EPISODES_LIFETIME,
)
from torch import Tensor

from algorithms.ray_compat import registered_env_creator

SAMPLER_STATE = "sampler"
METRICS_STATE = "metrics"


def episode_seed(seed: int, worker_index: int, env_index: int, episode: int) -> int:
    """Reset seed of episode ``episode`` of env ``env_index`` on runner ``worker_index`` (32 bits)."""
    return int(np.random.SeedSequence([seed, worker_index, env_index, episode]).generate_state(1)[0])


@dataclass
class Rollout:
    """One sample call in progress (:meth:`VectorEnvRunner.begin_sample`): T vector steps of E envs."""

    steps: int
    explore: bool
    obs: np.ndarray
    next_obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    actions: list[np.ndarray]
    """The actions [E, ...] of the steps taken so far."""
    episodes_done: int = 0


class VectorEnvRunner(EnvRunner, Checkpointable):
    """Steps ``num_envs_per_env_runner`` envs with the RLModule's ``act``; see the module docstring."""

    def __init__(self, *, config: Any, **kwargs: Any):
        super().__init__(config=config, **kwargs)
        self.worker_index = int(self.worker_index or 0)
        if self.worker_index > 0:  # a remote runner process: torch threads = CPUs given to it
            torch.set_num_threads(max(1, int(self.config.num_cpus_per_env_runner or 1)))
        # With remote runners, the local one (index 0) only provides spaces and holds no envs.
        self.samples = self.num_workers == 0 or self.worker_index > 0
        self.num_envs = int(self.config.num_envs_per_env_runner)
        self.base_seed = int(self.config.seed) if self.config.seed is not None else int(
            np.random.SeedSequence().generate_state(1)[0])
        self.generator = torch.Generator().manual_seed(
            episode_seed(self.base_seed, self.worker_index, 1_000_003, 0))
        self.envs: list[gym.Env] = []
        # env steps, episodes and sample calls counted but not yet logged to self.metrics (see _log_steps)
        self._unlogged, self._counters_logged = [0, 0, 0], False
        self.make_env()
        self.make_module()
        self._needs_reset = True

    # -- construction ------------------------------------------------------------------------------
    def _env_creator(self):
        import algorithms.envs  # noqa: F401  (registers the project's dmc/, bsuite/, minatar/ ids)

        env_ctx = self.config.env_config
        if not isinstance(env_ctx, EnvContext):
            env_ctx = EnvContext(env_ctx or {}, worker_index=self.worker_index, num_workers=self.num_workers)
        env = self.config.env
        if not env:
            raise ValueError("config.env is not set: give an env id, e.g. config.environment('dmc/cartpole-swingup')")
        creator = registered_env_creator(env) if isinstance(env, str) else None
        if creator is not None:
            return lambda: creator(env_ctx)
        if callable(env):
            return lambda: env(env_ctx)
        return lambda: gym.make(env, **dict(env_ctx))

    def make_env(self) -> None:
        for e in self.envs:
            e.close()
        creator = self._env_creator()
        first = creator()
        self.observation_space = first.observation_space
        self.action_space = first.action_space
        if self.samples:
            self.envs = [first] + [creator() for _ in range(self.num_envs - 1)]
        else:
            first.close()
            self.envs = []
        self._env_action = _action_mapper(self.action_space, bool(self.config.normalize_actions),
                                          bool(self.config.clip_actions))

    def make_module(self) -> None:
        spec = self.config.get_rl_module_spec(spaces=self.get_spaces(), inference_only=True)
        self.module = spec.build()
        self.module.eval()

    def get_spaces(self) -> dict[str, Any]:
        spaces = (self.observation_space, self.action_space)
        return {INPUT_ENV_SPACES: spaces, INPUT_ENV_SINGLE_SPACES: spaces, DEFAULT_MODULE_ID: spaces}

    def assert_healthy(self) -> None:
        assert self.module is not None and (self.envs or not self.samples)

    # -- hooks -----------------------------------------------------------------------------------
    def on_episode_start(self, env_indices: np.ndarray) -> None:
        """Called after the envs in ``env_indices`` were reset (a new episode starts in each)."""

    def on_weights_set(self) -> None:
        """Called after new module weights were loaded."""

    def compute_actions(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        """Module actions [E, ...] for observations [E, ...] (numpy in, numpy out)."""
        with torch.no_grad():
            actions = self.module.act(torch.from_numpy(obs), explore=explore, generator=self.generator)
        return actions.cpu().numpy()

    def extra_state(self) -> dict[str, Any]:
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- sampling ----------------------------------------------------------------------------------
    def _reset(self, e: int) -> np.ndarray:
        seed = episode_seed(self.base_seed, self.worker_index, e, self._episode[e])
        obs, _ = self.envs[e].reset(seed=seed)
        self._actions[e] = []
        self._ret[e] = 0.0
        self._len[e] = 0
        self._t0[e] = time.perf_counter()
        return np.asarray(obs, dtype=self.observation_space.dtype)

    def _initial_reset(self) -> None:
        n = self.num_envs
        self._episode = [0] * n
        self._actions: list[list[np.ndarray]] = [[] for _ in range(n)]
        self._ret = [0.0] * n
        self._len = [0] * n
        self._t0 = [0.0] * n
        self._obs = np.stack([self._reset(e) for e in range(n)])
        self._needs_reset = False
        self.on_episode_start(np.arange(n))

    def sample(self, *, num_timesteps: int | None = None, explore: bool | None = None, **kwargs: Any
               ) -> dict[str, np.ndarray]:
        """T = ``num_timesteps`` (default ``rollout_fragment_length``) vector steps of all E envs.

        Returns arrays [T, E, ...]: obs, action, reward, next_obs, terminated, truncated. The same as
        ``begin_sample``, then per step t ``step_envs(rollout, t, compute_actions(obs, explore))``, then
        ``end_sample`` (the phases a seed pack runs for several runners at once, with one action pass for
        all: :meth:`packed_actions`).
        """
        rollout = self.begin_sample(num_timesteps=num_timesteps, explore=explore)
        for t in range(rollout.steps):
            self.step_envs(rollout, t, self.compute_actions(self._obs, rollout.explore))
        return self.end_sample(rollout)

    def begin_sample(self, *, num_timesteps: int | None = None, explore: bool | None = None) -> Rollout:
        """Start a sample call: resets the envs on the first call, allocates the [T, E, ...] arrays."""
        if not self.samples:
            raise RuntimeError("this local VectorEnvRunner holds no envs: sample on the remote runners")
        if self._needs_reset:
            self._initial_reset()
        explore = self.config.explore if explore is None else explore
        steps = int(num_timesteps or self.config.rollout_fragment_length)
        n, shape, dtype = self.num_envs, self._obs.shape[1:], self._obs.dtype
        return Rollout(steps=steps, explore=bool(explore), obs=np.empty((steps, n) + shape, dtype),
                       next_obs=np.empty((steps, n) + shape, dtype), reward=np.empty((steps, n), np.float32),
                       terminated=np.empty((steps, n), bool), truncated=np.empty((steps, n), bool), actions=[])

    def step_envs(self, rollout: Rollout, t: int, action: np.ndarray) -> None:
        """Vector step t: every env e steps with ``action[e]`` [E, ...]; a finished episode is logged and its
        env reset (``next_obs`` keeps the final observation, the runner's obs the reset one)."""
        rollout.actions.append(action)
        rollout.obs[t] = self._obs
        new_obs = np.empty_like(self._obs)
        next_obs, reward, terminated, truncated = rollout.next_obs[t], rollout.reward[t], rollout.terminated[t], \
            rollout.truncated[t]
        env_action, episode_actions, ret, length = self._env_action, self._actions, self._ret, self._len
        started = []
        for e, env in enumerate(self.envs):
            a = action[e]
            o, r, term, trunc, _ = env.step(env_action(a))
            episode_actions[e].append(a)
            ret[e] += float(r)
            length[e] += 1
            next_obs[e] = o
            reward[e] = r
            terminated[e] = term
            truncated[e] = trunc
            if term or trunc:
                self._log_episode(length[e], ret[e], time.perf_counter() - self._t0[e])
                rollout.episodes_done += 1
                self._episode[e] += 1
                new_obs[e] = self._reset(e)
                started.append(e)
            else:
                new_obs[e] = o
        self._obs = new_obs
        if started:
            self.on_episode_start(np.asarray(started))

    def end_sample(self, rollout: Rollout) -> dict[str, np.ndarray]:
        """Finish a sample call: count its steps and episodes; returns the [T, E, ...] arrays."""
        self._log_steps(rollout.steps * self.num_envs, rollout.episodes_done)
        return {"obs": rollout.obs, "next_obs": rollout.next_obs, "reward": rollout.reward,
                "terminated": rollout.terminated, "truncated": rollout.truncated,
                "action": np.stack(rollout.actions)}

    # -- one action pass for the runners of a seed pack --------------------------------------------
    def supports_packed_actions(self) -> bool:
        """Whether :meth:`packed_actions` computes exactly this runner's ``compute_actions`` for several runners
        of one configuration (a seed pack's replicas, :class:`algorithms.offpolicy.packing.ReplicaPack`) with
        one pass of :meth:`action_network` over their stacked parameters; False (default): the pack samples
        runner by runner."""
        return False

    def action_network(self) -> torch.nn.Module:
        """The network whose outputs :meth:`packed_actions` reads (its parameters are stacked over the pack)."""
        raise NotImplementedError(f"{type(self).__name__} has no packed action pass")

    @classmethod
    def packed_actions(cls, runners: list[VectorEnvRunner], explore: bool,
                       forward: Callable[[list[int], Tensor], Tensor]) -> list[np.ndarray]:
        """Each runner's actions [E, ...] for its current observations, equal to its own
        ``compute_actions(obs, explore)`` (same generator draws in the same order). ``forward(rows, x)``:
        :meth:`action_network` of the runners ``rows`` (indices into ``runners``) on their inputs x [R, E, ...],
        outputs [R, E, ...], one vmapped call (the pack's)."""
        raise NotImplementedError(f"{cls.__name__} has no packed action pass")

    def _log_steps(self, num_steps: int, episodes: int) -> None:
        """Count one sample call's env steps and finished episodes. The four counters are sums, so they are
        logged to ``self.metrics`` once, summed, when the metrics are read (``get_metrics``, ``get_state``):
        four ``log_value`` calls per sample call cost more than the step of a small env. The first call after
        the logger was made or restored logs at once, so the counters' keys keep their place in the results."""
        self.num_env_steps_sampled_lifetime += num_steps
        u = self._unlogged
        u[0] += num_steps
        u[1] += episodes
        u[2] += 1
        if u[2] == 1 and not self._counters_logged:
            self._flush_step_counts()
            self._counters_logged = True

    def _flush_step_counts(self) -> None:
        steps, episodes, calls = self._unlogged
        if calls == 0:
            return
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED, steps, reduce="sum")
        self.metrics.log_value(NUM_EPISODES, episodes, reduce="sum")
        self.metrics.log_value(NUM_ENV_STEPS_SAMPLED_LIFETIME, steps, reduce="lifetime_sum")
        self.metrics.log_value(NUM_EPISODES_LIFETIME, episodes, reduce="lifetime_sum")
        self._unlogged = [0, 0, 0]

    def _log_episode(self, length: int, ret: float, sec: float) -> None:
        win = max(1, int(math.ceil(self.config.metrics_num_episodes_for_smoothing / (self.num_workers or 1))))
        self.metrics.log_value(EPISODE_LEN_MEAN, length, window=win)
        self.metrics.log_value(EPISODE_RETURN_MEAN, ret, window=win)
        self.metrics.log_value(EPISODE_LEN_MIN, length, reduce="min", window=win)
        self.metrics.log_value(EPISODE_RETURN_MIN, ret, reduce="min", window=win)
        self.metrics.log_value(EPISODE_LEN_MAX, length, reduce="max", window=win)
        self.metrics.log_value(EPISODE_RETURN_MAX, ret, reduce="max", window=win)

    def get_metrics(self) -> dict[str, Any]:
        self._flush_step_counts()
        return self.metrics.reduce()

    def sample_and_metrics(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One remote call for remote runners: (``sample(**kwargs)``, ``get_metrics()``)."""
        return self.sample(**kwargs), self.get_metrics()

    # -- state -----------------------------------------------------------------------------------
    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        state: dict[str, Any] = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.num_env_steps_sampled_lifetime}
        if self._check_component(COMPONENT_RL_MODULE, components, not_components):
            state[COMPONENT_RL_MODULE] = self.module.get_state()
        if self._check_component(SAMPLER_STATE, components, not_components):
            state[SAMPLER_STATE] = self.sampler_state()
        if self._check_component(METRICS_STATE, components, not_components):
            self._flush_step_counts()
            state[METRICS_STATE] = self.metrics.get_state()
        return state

    def sampler_state(self) -> dict[str, Any]:
        """Generator, per-env episode counters, and the actions of each episode in progress."""
        s: dict[str, Any] = {"base_seed": self.base_seed, "generator": self.generator.get_state(),
                             "started": not self._needs_reset, "extra": self.extra_state()}
        if not self._needs_reset:
            s.update(episode=list(self._episode), actions=[np.asarray(a) for a in self._actions],
                     ret=list(self._ret), obs=self._obs.copy())
        return s

    def set_state(self, state: dict[str, Any]) -> None:
        if COMPONENT_RL_MODULE in state:
            module_state = state[COMPONENT_RL_MODULE]
            if not isinstance(module_state, dict):  # an ObjectRef from sync_weights
                import ray

                module_state = ray.get(module_state)
            if DEFAULT_MODULE_ID in module_state:  # a MultiRLModule state from the learner
                module_state = module_state[DEFAULT_MODULE_ID]
            self.module.set_state(module_state)
            self.on_weights_set()
        if NUM_ENV_STEPS_SAMPLED_LIFETIME in state and SAMPLER_STATE in state:
            self.num_env_steps_sampled_lifetime = int(state[NUM_ENV_STEPS_SAMPLED_LIFETIME])
        if METRICS_STATE in state:
            self._unlogged, self._counters_logged = [0, 0, 0], False  # counts since the saved state are dropped
            self.metrics.set_state(state[METRICS_STATE])
        if SAMPLER_STATE in state:
            self.set_sampler_state(state[SAMPLER_STATE])

    def set_sampler_state(self, s: dict[str, Any]) -> None:
        """Rebuild every env mid-episode: reset with the episode's seed and replay its actions."""
        self.base_seed = int(s["base_seed"])
        self.generator.set_state(s["generator"])
        self.set_extra_state(s.get("extra", {}))
        if not s["started"] or not self.samples:
            self._needs_reset = True
            return
        self._episode = list(s["episode"])
        self._actions, self._ret = [[] for _ in range(self.num_envs)], list(s["ret"])
        self._len, self._t0 = [0] * self.num_envs, [time.perf_counter()] * self.num_envs
        for e, env in enumerate(self.envs):
            env.reset(seed=episode_seed(self.base_seed, self.worker_index, e, self._episode[e]))
            for a in s["actions"][e]:
                env.step(self._env_action(a))
                self._actions[e].append(np.asarray(a))
            self._len[e] = len(self._actions[e])
        self._obs = np.asarray(s["obs"]).copy()
        self._needs_reset = False

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict[str, Any]]:
        return (), {"config": self.config, "worker_index": self.worker_index, "num_workers": self.num_workers}

    def get_metadata(self) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        for e in self.envs:
            e.close()


def _action_mapper(space: gym.Space, normalize: bool, clip: bool):
    """Module action -> env action. Box: with ``normalize`` an action in [-1, 1] maps affinely to the
    space's bounds, ``low + (a + 1)/2 · (high − low)`` (RLlib's normalize_actions); with ``clip`` it is
    clipped to the bounds. The replay always stores the module's action."""
    if isinstance(space, gym.spaces.Discrete):
        return lambda a: int(a)
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"VectorEnvRunner: action space {space} is not supported; allowed: Box, Discrete")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    bounded = bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)))
    unit = bool(np.allclose(low, -1.0) and np.allclose(high, 1.0))

    def mapped(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        if normalize and bounded and not unit:
            a = low + (a + 1.0) * 0.5 * (high - low)
        if clip:
            a = np.clip(a, low, high)
        return a.astype(space.dtype)

    return mapped
