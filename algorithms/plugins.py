"""Registers everything the project ships, lazily (strings only): importing this is cheap.

Each issue adds its lines here.
"""

from algorithms.diagnostics.registry import register_diagnostic_lazy  # noqa: F401
from algorithms.registry import register_task

# Tasks (non-RL workloads): name -> "module:Class".
register_task("regression_demo", "algorithms.tasks.demo:RegressionDemo")

# Diagnostics: register_diagnostic_lazy(name, "module that calls register_diagnostic() on import").
register_diagnostic_lazy("plasticity", "algorithms.diagnostics.rllib_plasticity")
