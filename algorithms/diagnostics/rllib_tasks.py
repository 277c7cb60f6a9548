"""Diagnostic ``task_returns``: per-task episode returns for continual RL on task-sequence envs.

Works with any RLlib algorithm on an env built by :mod:`algorithms.envs.sequence` (``sequence/minatar``,
``sequence/ale``, ``sequence/tasks``), whose last step of each episode carries ``task_id``, ``task_episode_return`` and
``task_episode_length``. Reported (env runners, mean over the recent ``window`` episodes of that task):

- ``env/task_return/task_<k>``: episode return on task k
- ``env/task_episodes/task_<k>``: episodes finished on task k this iteration
- ``env/task_id``: the task of the most recent finished episode

After a checkpoint restore the env runners' global step counts are set to the restored lifetime env
steps, so the switch schedule continues where it stopped (RLlib does not checkpoint env objects).
"""

from __future__ import annotations

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
        def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
            if metrics_logger is None:
                return
            info = episode.get_infos(-1) if hasattr(episode, "get_infos") else {}
            if not isinstance(info, dict) or "task_episode_return" not in info:
                return
            k = int(info["task_id"])
            metrics_logger.log_value(("task_return", f"task_{k}"), float(info["task_episode_return"]),
                                     reduce="mean", window=settings.window)
            metrics_logger.log_value(("task_episodes", f"task_{k}"), 1, reduce="sum", clear_on_reduce=True)
            metrics_logger.log_value("task_id", float(k), reduce="mean", window=1)

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
