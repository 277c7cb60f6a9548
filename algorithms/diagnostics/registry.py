"""Registry of diagnostics that a spec enables by name.

A spec says ``diagnostics: {plasticity: {every: 10}}``. Each name maps to a :class:`Diagnostic`:
its settings model (pydantic, validated at spec load) and how it runs inside a trial:

- ``rllib_callback(settings) -> type[RLlibCallback]``: a callback class for any RLlib algorithm;
  it reports metrics through ``metrics_logger`` / the result dict under its group prefix
  (``plasticity/...``), which the tracking callback forwards to MLflow.
- ``task_hook(settings) -> TaskHook``: an object for :class:`algorithms.tasks.base.Task` workloads.

Diagnostics never talk to MLflow; they return numbers (and may write files into the trial's
``artifacts/`` folder).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_DIAGNOSTICS: dict[str, Diagnostic] = {}
_LAZY: dict[str, str] = {}


@dataclass(frozen=True)
class Diagnostic:
    name: str
    settings: type  # a pydantic BaseModel subclass
    rllib_callback: Callable[[Any], type] | None = None
    task_hook: Callable[[Any], Any] | None = None


def register_diagnostic(
    name: str,
    settings: type,
    *,
    rllib_callback: Callable[[Any], type] | None = None,
    task_hook: Callable[[Any], Any] | None = None,
) -> Diagnostic:
    diag = Diagnostic(name, settings, rllib_callback, task_hook)
    _DIAGNOSTICS[name] = diag
    return diag


def register_diagnostic_lazy(name: str, module: str) -> None:
    """Record that importing ``module`` registers diagnostic ``name`` (imported on first use)."""
    _LAZY[name] = module


def registered_diagnostics() -> list[str]:
    return sorted(set(_DIAGNOSTICS) | set(_LAZY))


def get_diagnostic(name: str) -> Diagnostic:
    if name not in _DIAGNOSTICS and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _DIAGNOSTICS:
        raise KeyError(name)
    return _DIAGNOSTICS[name]
