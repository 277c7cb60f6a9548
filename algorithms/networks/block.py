"""The ``network`` config block for RLlib's own algorithms (PPO, DQN).

``apply_network_block(algo_config, block)`` edits an RLlib AlgorithmConfig in place: our RLModule
(built by :mod:`algorithms.networks.builders`) with ``model_config["network"] = block``, and the
algorithm's torch learner with :class:`~algorithms.networks.rllib.NetworkLearnerMixin` (NaP, decoupled
weight decay, LR schedule). Our own algorithms (WPO, EVE) take the block through their config's
``network`` attribute instead (the registry assigns it), and call the builders themselves.

Importing this module imports only pydantic; RLlib and torch load when the block is applied.
"""

from __future__ import annotations

from typing import Any

from algorithms.networks.config import NetworkConfig

SUPPORTED = ("PPO", "DQN")


def apply_network_block(algo_config: Any, block: NetworkConfig) -> None:
    """Use our networks and learner mixin in an RLlib PPO or DQN AlgorithmConfig (in place)."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from algorithms.networks import rllib as adapters

    if isinstance(block, dict):
        block = NetworkConfig.model_validate(block)
    algo = getattr(algo_config, "algo_class", None)
    algo_name = getattr(algo, "__name__", type(algo_config).__name__)
    # Keyed by the algorithm's default torch learner: subclasses with their own learner are not ours.
    default_learner = algo_config.get_default_learner_class() if algo_config.framework_str == "torch" else None
    pairs = {
        adapters.PPOTorchLearner: (adapters.NetworkPPOTorchRLModule, adapters.NetworkPPOTorchLearner),
        adapters.DQNTorchLearner: (adapters.NetworkDQNTorchRLModule, adapters.NetworkDQNTorchLearner),
    }
    if default_learner not in pairs:
        raise ValueError(
            f"config.network: algorithm {algo_name} is not supported; the block applies to RLlib's "
            f"{', '.join(SUPPORTED)} (framework torch) and to our algorithms that declare a `network` setting"
        )
    module_cls, learner_cls = pairs[default_learner]
    current = getattr(algo_config, "_learner_class", None)
    if current is not None and not issubclass(current, learner_cls):
        raise ValueError(
            f"config.network: {algo_name} already has a custom learner_class {current.__name__}; mix "
            f"algorithms.networks.rllib.NetworkLearnerMixin into it instead"
        )
    algo_config.rl_module(
        rl_module_spec=RLModuleSpec(module_class=module_cls, model_config={"network": block.model_dump()})
    )
    algo_config.learners(learner_class=learner_cls)
