"""Name registries for algorithms, tasks and spec config blocks.

Entries are registered as ``"module:attribute"`` strings and imported lazily, so listing the
registry (``orchestra validate``, error messages) never imports torch-heavy modules.

- Algorithms: our RLlib Algorithm subclasses by short name (``WPO``, ``EVE``). RLlib's own built-ins
  (``PPO``, ``SAC``, ``DQN`` ...) resolve through RLlib's registry, and ``"pkg.mod:Class"`` works for
  any importable Algorithm subclass.
- Tasks: non-RL workloads (:class:`algorithms.tasks.base.Task` subclasses) by name.
- Config blocks: project blocks inside a spec's ``config`` (e.g. ``network``) with a pydantic model
  and a function that applies the validated block to an RLlib ``AlgorithmConfig``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_ALGORITHMS: dict[str, str] = {}
_TASKS: dict[str, str] = {}
_BLOCKS: dict[str, ConfigBlock] = {}


def import_object(target: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``) and return the attribute."""
    if ":" in target:
        module_name, attr = target.split(":", 1)
    else:
        module_name, _, attr = target.rpartition(".")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def register_algorithm(name: str, target: str) -> None:
    """Register an RLlib Algorithm subclass under ``name`` (``target`` is ``"module:Class"``)."""
    _ALGORITHMS[name] = target


def register_task(name: str, target: str) -> None:
    """Register a :class:`~algorithms.tasks.base.Task` subclass under ``name``."""
    _TASKS[name] = target


def registered_algorithms() -> list[str]:
    return sorted(_ALGORITHMS)


def registered_tasks() -> list[str]:
    return sorted(_TASKS)


def rllib_algorithms() -> list[str]:
    """Names of RLlib's built-in algorithms."""
    from ray.rllib.algorithms.registry import ALGORITHMS

    return sorted(ALGORITHMS)


def get_algorithm_class(name: str) -> type:
    """Resolve an algorithm name: ours first, then RLlib's built-ins, then ``module:Class``."""
    if name in _ALGORITHMS:
        return import_object(_ALGORITHMS[name])
    from ray.rllib.algorithms.registry import ALGORITHMS

    if name in ALGORITHMS:
        cls, _ = ALGORITHMS[name]()
        return cls
    if ":" in name or "." in name:
        return import_object(name)
    raise KeyError(name)


def get_task_class(name: str) -> type:
    if name in _TASKS:
        return import_object(_TASKS[name])
    if ":" in name:
        return import_object(name)
    raise KeyError(name)


@dataclass(frozen=True)
class ConfigBlock:
    """A project block inside a spec's ``config`` (for RLlib algorithms).

    model: pydantic model validating the block.
    apply: ``apply(algo_config, block)`` mutates an RLlib ``AlgorithmConfig`` in place. If the
      algorithm's config class already has an attribute named like the block (our own algorithms),
      the validated block is assigned to it instead and ``apply`` is not called.
    """

    name: str
    model: type
    apply: Callable[[Any, Any], None]


def register_config_block(name: str, model: type, apply: Callable[[Any, Any], None]) -> None:
    _BLOCKS[name] = ConfigBlock(name, model, apply)


def config_blocks() -> dict[str, ConfigBlock]:
    return dict(_BLOCKS)


def load_builtin_plugins() -> None:
    """Import the modules that register the project's own algorithms, tasks, blocks, diagnostics."""
    importlib.import_module("algorithms.plugins")
