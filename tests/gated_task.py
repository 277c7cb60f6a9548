"""Test-only task for launches that must be interrupted at a known point: ``regression_demo`` whose
``train()`` for iteration ``gate_iteration`` (and later ones) waits until ``gate_file`` exists.

Tests copy this file into the launch's working directory (the driver's cwd is on every Ray worker's
PYTHONPATH) and name it in the spec's ``imports``. A trial thus stops after exactly
``gate_iteration - 1`` results until the test releases it, so "kill the driver / the node while the
trials are still running" holds by construction, not by how fast the trials happen to run. The wait
is bounded (``gate_timeout_s``): a test that never releases the gate fails instead of hanging.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from algorithms.registry import register_task
from algorithms.tasks.demo import RegressionDemo, RegressionDemoConfig


class GatedRegressionConfig(RegressionDemoConfig):
    gate_iteration: int = Field(0, ge=0)
    """Iteration (1-based) whose train() waits for ``gate_file``; 0: never wait."""
    gate_file: str = ""
    """Path whose existence opens the gate."""
    gate_timeout_s: float = Field(1800.0, gt=0)
    """Raise if the gate is still closed after this long."""


class GatedRegression(RegressionDemo):
    Config = GatedRegressionConfig

    def train(self) -> dict[str, float]:
        c = self.config
        iteration = self.steps // c.steps_per_iteration + 1
        if c.gate_iteration and iteration >= c.gate_iteration:
            deadline = time.monotonic() + c.gate_timeout_s
            while not Path(c.gate_file).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gated_regression: {c.gate_file} not created within {c.gate_timeout_s:.0f}s")
                time.sleep(0.2)
        return super().train()


register_task("gated_regression", f"{__name__}:GatedRegression")
