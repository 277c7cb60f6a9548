"""Diagnostic ``task_returns``: per-task episode returns for continual RL on task-sequence envs.

Works with any RLlib algorithm on an env built by :mod:`algorithms.envs.sequence` (``sequence/minatar``,
``sequence/ale``, ``sequence/tasks``), whose last step of each episode carries ``task_id``, ``task_episode_return`` and
``task_episode_length``. Reported at the end of every ``sample()`` call of each env runner, for every task
that has finished at least one episode there:

- ``env/task_return/task_<k>``: R̄_k = (1/|W_k|) Σ_{e ∈ W_k} G_e, the mean return of task k's most recent
  ``window`` finished episodes W_k (kept by the callback across iterations, so the value is defined in every
  iteration, including those in which task k finished no episode: a 2,500-step MinAtar freeway episode
  outlasts a 2,000-step PPO iteration); with several env runners, the mean of their R̄_k
- ``env/task_episodes/task_<k>``: episodes finished on task k this iteration
- ``env/task_id``: the task of the most recent finished episode

(RLlib's own windowed mean would average per-iteration means, and reports NaN for an iteration without an
episode of the task, so it cannot give "the last 20 episodes of game k at the end of its segment".)

After a checkpoint restore the env runners' global step counts are set to the restored lifetime env
steps, so the switch schedule continues where it stopped (RLlib does not checkpoint env objects).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from algorithms.diagnostics.registry import register_diagnostic


class TaskReturnsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: int = Field(20, ge=1)
    """Episodes per task averaged in task_return."""


def make_task_returns_callback(settings: TaskReturnsSettings) -> type:
    from ray.rllib.callbacks.callbacks import RLlibCallback

    class TaskReturnsCallback(RLlibCallback):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._recent: dict[int, deque[float]] = {}
            """task -> returns of its last ``window`` finished episodes on this env runner"""
            self._ended: dict[int, int] = {}
            self._last_task: int | None = None

        def on_episode_end(self, *, episode: Any, **kwargs: Any) -> None:
            info = episode.get_infos(-1) if hasattr(episode, "get_infos") else {}
            if not isinstance(info, dict) or "task_episode_return" not in info:
                return
            k = int(info["task_id"])
            self._recent.setdefault(k, deque(maxlen=settings.window)).append(float(info["task_episode_return"]))
            self._ended[k] = self._ended.get(k, 0) + 1
            self._last_task = k

        def on_sample_end(self, *, metrics_logger: Any = None, **kwargs: Any) -> None:
            if metrics_logger is None:
                return
            for k in sorted(self._recent):
                returns = self._recent[k]
                metrics_logger.log_value(("task_return", f"task_{k}"), sum(returns) / len(returns),
                                         reduce="mean", window=1)
                metrics_logger.log_value(("task_episodes", f"task_{k}"), self._ended.pop(k, 0), reduce="sum",
                                         clear_on_reduce=True)
            if self._last_task is not None:
                metrics_logger.log_value("task_id", float(self._last_task), reduce="mean", window=1)

        def on_checkpoint_loaded(self, *, algorithm: Any, **kwargs: Any) -> None:
            from algorithms.envs.sequence import set_task_sequence_step

            steps = int(algorithm.metrics.peek(("env_runners", "num_env_steps_sampled_lifetime"), default=0) or 0)

            def restore(runner: Any) -> int:
                return set_task_sequence_step(runner.env, steps)

            group = getattr(algorithm, "env_runner_group", None)
            if group is not None:
                group.foreach_env_runner(restore, local_env_runner=True)

    return TaskReturnsCallback


register_diagnostic("task_returns", TaskReturnsSettings, rllib_callback=make_task_returns_callback)
