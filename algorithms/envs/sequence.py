"""Task sequences for continual RL: one gymnasium env that cycles through tasks on a step schedule.

`TaskSequenceEnv(tasks, switch_every)` holds one live env per task and plays task
    k(s) = floor(s / switch_every) mod K
where s is the global env-step count and K the number of tasks (cycled: 0, 1, ..., K-1, 0, ...).

Switch timing. Episodes are never cut: the task is chosen at each `reset` from the current count, so
a switch takes effect at the first episode boundary at or after the boundary step. (If one episode
spans several boundaries, the tasks scheduled in between are skipped.) `info["task_switched"]` is
True on the reset that changed task; LR schedules that restart at task boundaries can key on it.

Compatible spaces (padding, not per-task heads):
- Observations must all be `Box` with the same number of dimensions; they are zero-padded at the end
  of every dimension to the elementwise maximum shape (MinAtar: 10 x 10 x C, padded to the largest C).
  Bounds are the elementwise min/max over tasks, and include the padding value 0.
- Discrete actions: `Discrete(max n)`; an action outside a task's own range is replaced by
  `invalid_action` (default 0, no-op in MinAtar's action sets). `sequence/minatar` uses MinAtar's full
  6-action set for every game, so there every action is valid and means the same move in every game.
  `sequence/ale` likewise uses ALE's full action set: every game has `Discrete(18)` and the same
  observation space `Box(0, 255, (4, 84, 84), uint8)`, so nothing is padded or replaced there.
- Box actions must be identical across tasks.

Info: every step and reset carries `task_id` (int index into `task_names`), `global_step` (the count
after this step); episode ends also carry `task_episode_return` and `task_episode_length`, the
return and length of the episode that just ended on task `task_id`.

Global step and restoring the schedule. The count lives in the env, which under RLlib lives in an env
runner process, so it has to be kept global explicitly:
- `step_scale`: how many global steps one step of this copy stands for. With R env runners of E envs
  each stepping in lockstep, `step_scale = R * E` keeps every copy's count equal to the global one.
- `start_step`: the count to start from (e.g. a resumed run's sampled env steps).
- `get_state()` / `set_state(state)` / `set_global_step(n)` read and restore the count; RLlib does
  not checkpoint env objects, so after `Algorithm.from_checkpoint` / `restore` call
  `set_task_sequence_step(env_runner.env, n)` on every env runner (e.g. via
  `algo.env_runner_group.foreach_env_runner`) with n = the restored lifetime env steps. A restored
  count takes effect at the next episode boundary, like any switch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np

from algorithms.envs.registration import ALE_GAMES, MINATAR_GAMES, ale_env_id

_TASK_KEYS = {"id", "kwargs", "name"}


def task_index(global_step: int, switch_every: int, num_tasks: int) -> int:
    """k(s) = floor(s / switch_every) mod num_tasks."""
    return (int(global_step) // int(switch_every)) % int(num_tasks)


def _normalise_tasks(
    tasks: Sequence[str | Mapping[str, Any]] | None, env_id: str | None, task_kwargs: Sequence[Mapping] | None
) -> list[dict[str, Any]]:
    if (tasks is None) == (env_id is None):
        raise ValueError("give either tasks=[env ids or {id, kwargs, name}] or env_id=... with task_kwargs=[...]")
    if env_id is not None:
        if not task_kwargs:
            raise ValueError("task_kwargs must be a non-empty list of kwargs dicts when env_id is given")
        tasks = [{"id": env_id, "kwargs": dict(kw), "name": f"{env_id}[{i}]"} for i, kw in enumerate(task_kwargs)]
    elif task_kwargs is not None:
        raise ValueError("task_kwargs goes with env_id; with tasks=[...] put kwargs in each task")
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of env ids or task dicts; got {tasks!r}")
    out = []
    for i, task in enumerate(tasks):
        if isinstance(task, str):
            task = {"id": task}
        if not isinstance(task, Mapping) or "id" not in task or set(task) - _TASK_KEYS:
            raise ValueError(f"tasks[{i}] must be an env id or a dict with keys {sorted(_TASK_KEYS)} ('id' required); got {task!r}")
        out.append({"id": task["id"], "kwargs": dict(task.get("kwargs") or {}), "name": task.get("name", task["id"])})
    return out


def _padded_observation_space(spaces: list[gymnasium.Space]) -> gymnasium.spaces.Box:
    if not all(isinstance(s, gymnasium.spaces.Box) for s in spaces):
        raise ValueError(f"task observation spaces must all be Box to be padded; got {spaces}")
    if len({len(s.shape) for s in spaces}) != 1:
        raise ValueError(f"task observation spaces must have the same number of dimensions; got {[s.shape for s in spaces]}")
    shape = tuple(int(max(d)) for d in zip(*(s.shape for s in spaces)))
    dtype = np.result_type(*(s.dtype for s in spaces))
    low, high = np.zeros(shape, np.float64), np.zeros(shape, np.float64)
    for s in spaces:
        region = tuple(slice(0, d) for d in s.shape)
        low[region] = np.minimum(low[region], s.low)
        high[region] = np.maximum(high[region], s.high)
    return gymnasium.spaces.Box(low.astype(dtype), high.astype(dtype), shape, dtype)


def _joint_action_space(spaces: list[gymnasium.Space]) -> gymnasium.Space:
    if all(isinstance(s, gymnasium.spaces.Discrete) for s in spaces):
        if any(int(s.start) != 0 for s in spaces):
            raise ValueError("Discrete task action spaces must start at 0")
        return gymnasium.spaces.Discrete(max(int(s.n) for s in spaces))
    if all(isinstance(s, gymnasium.spaces.Box) for s in spaces) and all(s == spaces[0] for s in spaces):
        return spaces[0]
    raise ValueError(f"task action spaces must be all Discrete or all the same Box; got {spaces}")


class TaskSequenceEnv(gymnasium.Env):
    """Cycles through tasks every `switch_every` global env steps; see the module docstring."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        tasks: Sequence[str | Mapping[str, Any]] | None = None,
        switch_every: int | None = None,
        *,
        env_id: str | None = None,
        task_kwargs: Sequence[Mapping[str, Any]] | None = None,
        start_step: int = 0,
        step_scale: int = 1,
        invalid_action: int = 0,
    ):
        if not isinstance(switch_every, int) or switch_every < 1:
            raise ValueError(f"switch_every must be an integer >= 1 (env steps per task); got {switch_every!r}")
        if not isinstance(step_scale, int) or step_scale < 1:
            raise ValueError(f"step_scale must be an integer >= 1; got {step_scale!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0; got {start_step!r}")
        specs = _normalise_tasks(tasks, env_id, task_kwargs)
        self.task_names = [s["name"] for s in specs]
        self.switch_every, self.step_scale, self.invalid_action = switch_every, step_scale, int(invalid_action)
        self._envs = [gymnasium.make(s["id"], disable_env_checker=True, **s["kwargs"]) for s in specs]
        self.observation_space = _padded_observation_space([e.observation_space for e in self._envs])
        self.action_space = _joint_action_space([e.action_space for e in self._envs])
        self._num_actions = [int(e.action_space.n) if isinstance(e.action_space, gymnasium.spaces.Discrete) else None
                             for e in self._envs]
        self.global_step = start_step
        self.current_task: int | None = None
        self._pending_seeds: dict[int, int] = {}
        self._return, self._length = 0.0, 0
        self.episodes_per_task = [0] * len(self._envs)
        """finished episodes per task in this env copy"""

    @property
    def num_tasks(self) -> int:
        return len(self._envs)

    def task_for_step(self, global_step: int) -> int:
        return task_index(global_step, self.switch_every, self.num_tasks)

    def set_global_step(self, global_step: int) -> None:
        """Restores the global count; the task follows at the next episode boundary."""
        if int(global_step) < 0:
            raise ValueError(f"global_step must be >= 0; got {global_step!r}")
        self.global_step = int(global_step)

    def get_state(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "current_task": self.current_task}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "global_step" not in state:
            raise ValueError(f"state needs key 'global_step'; got keys {sorted(state)}")
        self.set_global_step(state["global_step"])

    def _pad(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        if obs.shape == self.observation_space.shape:
            return obs.astype(self.observation_space.dtype, copy=False)
        out = np.zeros(self.observation_space.shape, self.observation_space.dtype)
        out[tuple(slice(0, d) for d in obs.shape)] = obs
        return out

    def _info(self, info: Mapping[str, Any]) -> dict[str, Any]:
        return {**info, "task_id": self.current_task, "global_step": self.global_step}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            # Each task env is seeded at its next reset from this seed, so a seeded sequence replays.
            self._pending_seeds = {i: int(s) for i, s in enumerate(self.np_random.integers(2**31 - 1, size=self.num_tasks))}
        task = self.task_for_step(self.global_step)
        switched = self.current_task is not None and task != self.current_task
        self.current_task = task
        obs, info = self._envs[task].reset(seed=self._pending_seeds.pop(task, None), options=options)
        self._return, self._length = 0.0, 0
        return self._pad(obs), {**self._info(info), "task_switched": switched}

    def step(self, action):
        if self.current_task is None:
            raise RuntimeError("call reset() before step()")
        n = self._num_actions[self.current_task]
        if n is not None and not 0 <= int(action) < n:
            action = self.invalid_action
        obs, reward, terminated, truncated, info = self._envs[self.current_task].step(action)
        self.global_step += self.step_scale
        self._return += float(reward)
        self._length += 1
        info = self._info(info)
        if terminated or truncated:
            info["task_episode_return"] = self._return
            info["task_episode_length"] = self._length
            self.episodes_per_task[self.current_task] += 1
        return self._pad(obs), reward, terminated, truncated, info

    def close(self) -> None:
        for env in self._envs:
            env.close()


def make_minatar_sequence(
    games: Sequence[str] = MINATAR_GAMES,
    switch_every: int | None = None,
    *,
    start_step: int = 0,
    step_scale: int = 1,
    minimal_action_set: bool = False,
    sticky_action_prob: float = 0.1,
    difficulty_ramping: bool = True,
    max_episode_steps: int | None = None,
) -> TaskSequenceEnv:
    """`sequence/minatar`: MinAtar games cycled every `switch_every` env steps (RLlib:
    `config.environment("sequence/minatar", env_config={"games": [...], "switch_every": N})`).

    Observations 10 x 10 x max channels (zero-padded), actions MinAtar's full set of 6 unless
    `minimal_action_set` (then Discrete(max) with out-of-range actions as no-op)."""
    if isinstance(games, str) or not games or any(g not in MINATAR_GAMES for g in games):
        raise ValueError(f"games must be a non-empty list drawn from {list(MINATAR_GAMES)}; got {games!r}")
    kwargs = {"minimal_action_set": minimal_action_set, "sticky_action_prob": sticky_action_prob,
              "difficulty_ramping": difficulty_ramping, "max_episode_steps": max_episode_steps}
    tasks = [{"id": f"minatar/{g}", "kwargs": kwargs, "name": g} for g in games]
    return TaskSequenceEnv(tasks, switch_every, start_step=start_step, step_scale=step_scale)


# This project's default `sequence/ale` games: ten games in the shape of the sequential ALE of Lyle et al. (2024,
# "Normalization and effective learning rates in reinforcement learning": ten games, each for a fixed frame
# budget, cycled); the choice of games is ours, with scores on different scales and no shared visuals.
ALE_SEQUENCE_GAMES: tuple[str, ...] = (
    "pong", "breakout", "space_invaders", "seaquest", "qbert",
    "asterix", "ms_pacman", "enduro", "beam_rider", "freeway",
)


def make_ale_sequence(
    games: Sequence[str] = ALE_SEQUENCE_GAMES,
    frames_per_game: int | None = None,
    *,
    start_step: int = 0,
    step_scale: int = 1,
    frame_skip: int = 4,
    **ale_kwargs: Any,
) -> TaskSequenceEnv:
    """`sequence/ale`: ALE games (ale_py ROM ids such as `pong`) cycled every `frames_per_game` emulator
    frames (RLlib: `config.environment("sequence/ale", env_config={"games": [...], "frames_per_game": N})`).

    The schedule runs on agent steps: each game plays for switch_every = frames_per_game / frame_skip
    global env steps (one agent step is `frame_skip` frames), so `frames_per_game` must be a multiple of
    `frame_skip`. Per-game returns are the diagnostic `task_returns`' `env/task_return/task_<k>`, k the
    game's index in `games`. `ale_kwargs` are :func:`algorithms.envs.ale.make_ale_env`'s keywords
    (sticky actions, `max_num_frames_per_episode`, `terminal_on_life_loss`, ...), the same for every game;
    with the default full action set all games share `Discrete(18)` and (4, 84, 84) uint8 observations."""
    if isinstance(games, str) or not games or any(g not in ALE_GAMES for g in games):
        raise ValueError(f"games must be a non-empty list of single-player ale_py ROM ids (e.g. {list(ALE_SEQUENCE_GAMES[:3])},"
                         f" see algorithms.envs.registration.ALE_GAMES); got {games!r}")
    if not isinstance(frames_per_game, int) or isinstance(frames_per_game, bool) or frames_per_game < frame_skip \
            or frames_per_game % frame_skip:
        raise ValueError(f"frames_per_game must be a positive multiple of frame_skip ({frame_skip}) emulator frames; "
                         f"got {frames_per_game!r}")
    tasks = [{"id": ale_env_id(g), "kwargs": {"frame_skip": frame_skip, **ale_kwargs}, "name": g} for g in games]
    return TaskSequenceEnv(tasks, frames_per_game // frame_skip, start_step=start_step, step_scale=step_scale)


def task_sequence_envs(env: Any) -> list[TaskSequenceEnv]:
    """The TaskSequenceEnv instances inside a gymnasium env or a synchronous vector env (wrappers
    included), e.g. an RLlib env runner's `env`."""
    base = env.unwrapped
    candidates = getattr(base, "envs", [base])
    return [e.unwrapped for e in candidates if isinstance(e.unwrapped, TaskSequenceEnv)]


def set_task_sequence_step(env: Any, global_step: int) -> int:
    """Sets the global step of every TaskSequenceEnv in `env` (a gymnasium env, or a sync or async
    vector env, wrappers included); returns the number of envs set."""
    found = task_sequence_envs(env)
    for e in found:
        e.set_global_step(global_step)
    if not found and isinstance(env.unwrapped, gymnasium.vector.AsyncVectorEnv):
        env.call("set_global_step", global_step)  # runs in each worker process
        return env.num_envs
    return len(found)
