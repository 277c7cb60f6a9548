"""DeepMind Control Suite tasks as gymnasium environments (`dmc/<domain>-<task>`).

Our own adapter over `dm_control.suite.load` (not shimmy's, which keeps dict observations, the task's
action bounds and reports a termination with non-zero discount as truncation). Guarantees:

- Observation: the task's observation dict flattened in the suite's key order into one float32 vector,
  `Box(-inf, inf, (sum of sizes,), float32)`.
- Action: `Box(-1, 1, (A,), float32)`. An action `a` is clipped to [-1, 1] and mapped affinely to the
  task's bounds, `u = low + (a + 1) / 2 * (high - low)` (so -1 -> low, 1 -> high). Dimensions whose
  bounds are effectively unbounded (|bound| >= 1e6: the `lqr` tasks use +-1e10) are passed through
  unchanged, i.e. the agent's control is limited to [-1, 1] there.
- Time limit: the task's own (1000 control steps for every suite task except `lqr`, whose limit is
  infinite and which gets `DEFAULT_INFINITE_TASK_STEPS` control steps here). Reaching it ends the
  episode with `truncated=True, terminated=False`; only a task's own termination (`lqr` reaching the
  origin) gives `terminated=True`. `time_limit` (seconds, dm_control's unit) overrides it.
- Action repeat: `action_repeat=k` applies each action for k control steps and returns the summed
  reward; the episode still ends at the task's limit in control steps (ceil(1000 / k) agent steps).
- Seeding: `reset(seed=s)` reseeds the task's RandomState, which drives all episode initialisation in
  the suite, so equal seeds give identical trajectories for equal actions.
- Rendering is not offered. quadruped-escape still needs an OpenGL context at reset (it uploads its
  terrain); `algorithms.envs._gl` picks headless EGL when no display and no MUJOCO_GL is set.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium
import numpy as np

from algorithms.envs._gl import import_with_headless_gl

# dm_control.suite, imported with a headless renderer chosen where the user set none.
suite = import_with_headless_gl("dm_control.suite")

DEFAULT_INFINITE_TASK_STEPS = 1000
"""Control steps per episode for tasks whose own time limit is infinite (the `lqr` tasks)."""

_UNBOUNDED = 1e6


def rescale_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Maps an action in [-1, 1] to [low, high]: `u = low + (clip(a, -1, 1) + 1) / 2 * (high - low)`.

    Dimensions with |low| or |high| >= 1e6 (effectively unbounded) are returned as `clip(a, -1, 1)`.
    """
    a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    bounded = (np.abs(low) < _UNBOUNDED) & (np.abs(high) < _UNBOUNDED)
    return np.where(bounded, low + (a + 1.0) * 0.5 * (high - low), a)


class DMCEnv(gymnasium.Env[np.ndarray, np.ndarray]):
    """One DeepMind Control Suite task; see the module docstring for the guarantees."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        domain: str,
        task: str,
        action_repeat: int = 1,
        time_limit: float | None = None,
        task_kwargs: dict[str, Any] | None = None,
        environment_kwargs: dict[str, Any] | None = None,
    ):
        if (domain, task) not in suite.ALL_TASKS:
            raise ValueError(
                f"dm_control task (domain={domain!r}, task={task!r}) does not exist; allowed: "
                f"{sorted(f'{d}-{t}' for d, t in suite.ALL_TASKS)}"
            )
        if not isinstance(action_repeat, int) or action_repeat < 1:
            raise ValueError(f"action_repeat must be an integer >= 1; got {action_repeat!r}")
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds (or None for the task's own); got {time_limit!r}")
        self.domain, self.task, self.action_repeat = domain, task, action_repeat
        task_kwargs = dict(task_kwargs or {})
        if time_limit is not None:
            task_kwargs["time_limit"] = time_limit
        self._env = suite.load(domain, task, task_kwargs=task_kwargs, environment_kwargs=environment_kwargs)
        if math.isinf(self._env._step_limit):
            task_kwargs["time_limit"] = DEFAULT_INFINITE_TASK_STEPS * self._env.control_timestep()
            self._env = suite.load(domain, task, task_kwargs=task_kwargs, environment_kwargs=environment_kwargs)
        # dm_control counts control steps against this limit; we read it to tell truncation from
        # termination exactly (a LAST step before the limit is the task's own termination).
        self.step_limit: float = self._env._step_limit
        self._control_steps = 0

        spec = self._env.action_spec()
        self._action_low = np.broadcast_to(spec.minimum, spec.shape).astype(np.float64)
        self._action_high = np.broadcast_to(spec.maximum, spec.shape).astype(np.float64)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=spec.shape, dtype=np.float32)
        obs_dim = sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values())
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape=(obs_dim,), dtype=np.float32)

    @property
    def physics(self):
        """The task's MuJoCo physics (read its state in tests and diagnostics)."""
        return self._env.physics

    @property
    def control_timestep(self) -> float:
        return self._env.control_timestep()

    @staticmethod
    def _flatten(observation: dict[str, Any]) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in observation.values()])

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            # The suite draws every initial state from task.random (a np.random.RandomState).
            self._env.task.random.seed(seed)
        self._control_steps = 0
        timestep = self._env.reset()
        return self._flatten(timestep.observation), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        control = rescale_action(action, self._action_low, self._action_high)
        reward = 0.0
        for _ in range(self.action_repeat):
            timestep = self._env.step(control)
            self._control_steps += 1
            reward += timestep.reward or 0.0
            if timestep.last():
                break
        truncated = timestep.last() and self._control_steps >= self.step_limit
        terminated = timestep.last() and not truncated
        return self._flatten(timestep.observation), float(reward), terminated, truncated, {}

    def close(self) -> None:
        self._env.close()
