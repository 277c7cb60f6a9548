"""Running and recording experiments: specs, Ray Tune runner, MLflow tracking, CLI.

The Python API::

    from orchestration import run
    result = run("experiments/quickstart.yaml", overrides=["config.lr=1e-3"])
"""

from __future__ import annotations

from typing import Any


def run(spec_or_path: Any, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Load, validate and run an experiment spec; see :func:`orchestration.runner.run`."""
    from orchestration.runner import run as _run

    return _run(spec_or_path, overrides=overrides, **kwargs)


def resume(name: str, **kwargs: Any) -> Any:
    """Continue an interrupted launch; see :func:`orchestration.runner.resume`."""
    from orchestration.runner import resume as _resume

    return _resume(name, **kwargs)


__all__ = ["run", "resume"]
