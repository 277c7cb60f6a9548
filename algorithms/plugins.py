"""Registers everything the project ships, lazily (strings only): importing this is cheap.

A new algorithm, task, config block or diagnostic adds its lines here.
"""

from algorithms.diagnostics.registry import register_diagnostic_lazy  # noqa: F401
from algorithms.registry import register_task

# Tasks (non-RL workloads): name -> "module:Class".
register_task("regression_demo", "algorithms.tasks.demo:RegressionDemo")

# Diagnostics: register_diagnostic_lazy(name, "module that calls register_diagnostic() on import").
register_diagnostic_lazy("plasticity", "algorithms.diagnostics.rllib_plasticity")

# Networks: the spec's `config.network` block (pydantic model imported here; RLlib only on apply).
from algorithms.networks.block import apply_network_block  # noqa: E402
from algorithms.networks.config import NetworkConfig  # noqa: E402
from algorithms.registry import register_config_block  # noqa: E402

register_config_block("network", NetworkConfig, apply_network_block)

# Nonstationary supervised benchmarks on scikit-learn's digits (plasticity).
register_task("digits_random_labels", "algorithms.tasks.digits:DigitsRandomLabels")
register_task("digits_permuted", "algorithms.tasks.digits:DigitsPermuted")
register_task("digits_shifting_regression", "algorithms.tasks.digits:DigitsShiftingRegression")

# Algorithms on the off-policy core (WPO, EVE) and bsuite scoring.
from algorithms.registry import register_algorithm  # noqa: E402

register_algorithm("WPO", "algorithms.wpo.config:WPO")
register_algorithm("EVE", "algorithms.eve.config:EVE")
register_diagnostic_lazy("bsuite", "algorithms.diagnostics.rllib_bsuite")

# DataRater meta-learned data filtering (meta-gradients by algorithms.meta).
register_task("datarater_digits", "algorithms.tasks.datarater_digits:DigitsDataRater")
register_task("datarater_text", "algorithms.tasks.datarater_text:TextDataRater")

# Analysis: credit-assignment, convergence and per-task return diagnostics.
register_diagnostic_lazy("credit", "algorithms.diagnostics.rllib_credit")
register_diagnostic_lazy("convergence", "algorithms.diagnostics.rllib_convergence")
register_diagnostic_lazy("task_returns", "algorithms.diagnostics.rllib_tasks")
