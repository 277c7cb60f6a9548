"""The task interface: a non-RL workload that orchestration runs as a Tune trainable.

A task is plain Python: built from a validated config and a seed, advanced one *iteration* at a time
by :meth:`Task.train`, checkpointed through :meth:`state_dict` / :meth:`load_state_dict`. The Tune
wrapper (``orchestration.trainable``) owns Tune, checkpoints on disk and the diagnostics hooks.

Result keys follow the project convention ``<group>/<name>[/<qualifier>]`` with groups such as
``train``, ``eval``, ``plasticity``, ``meta``. :attr:`Task.steps` is the task's own step counter
(inner optimiser steps); it is the MLflow step of every metric of the iteration.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict


class TaskConfig(BaseModel):
    """Base for task configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Task(abc.ABC):
    """Base class of non-RL workloads.

    Subclasses set ``Config`` to their :class:`TaskConfig` subclass. ``artifact_dir`` is set by the
    wrapper to the trial's ``artifacts/`` folder (uploaded to the trial's MLflow run), or None.
    """

    Config: ClassVar[type[TaskConfig]] = TaskConfig

    def __init__(self, config: TaskConfig, seed: int, artifact_dir: Path | None = None):
        self.config = config
        self.seed = seed
        self.artifact_dir = artifact_dir
        self.steps = 0

    @abc.abstractmethod
    def train(self) -> dict[str, float]:
        """Run one iteration (one or more inner steps, advancing ``self.steps``); return metrics."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (include ``steps`` and RNG states)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def modules(self) -> dict[str, Any]:
        """The torch modules diagnostics may inspect, by name (default: none)."""
        return {}

    def probe_inputs(self, n: int) -> Any:
        """A batch of ``n`` fixed inputs for activation diagnostics (default: not available)."""
        raise NotImplementedError(f"{type(self).__name__} provides no probe inputs")


class TaskHook(Protocol):
    """What a diagnostic provides for tasks (``Diagnostic.task_hook(settings)`` returns one)."""

    def on_iteration(self, task: Task, iteration: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
