"""The one place networks are built: MLP/CNN, normalisation, NaP, weight decay, LR schedules, and the
plasticity interventions (ReDo, Shrink & Perturb, resets, CReLU).

- ``config``: :class:`NetworkConfig` (the spec's ``config.network`` block; pydantic only, no torch).
- ``builders``: :func:`build_mlp`, :func:`build_cnn`, :func:`build_nature_cnn` (Mnih et al. 2015),
  :func:`build_network` (picks the block's ``encoder``), :class:`Network`.
- ``grouped``: :func:`build_grouped_mlp`, G MLPs without shared parameters run as one network.
- ``updates``: pieces around any torch optimiser (:class:`NaP`, :class:`DecoupledWeightDecay`,
  :class:`LRSchedule`, :class:`Chain`, :func:`network_updates`, :func:`nap_project_`).
- ``interventions``: :class:`ReDo`, :class:`ShrinkPerturb`, :class:`Reset` (update pieces, built by
  :func:`network_updates` from the block's ``redo``, ``shrink_perturb``, ``reset`` keys).
- ``rllib``: RLModules for RLlib's PPO/DQN built from the config, and :class:`NetworkLearnerMixin`.
- ``block``: the ``network`` config block applied to an RLlib AlgorithmConfig.

Names are re-exported lazily so that importing the config does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NetworkConfig": "config",
    "WeightDecayConfig": "config",
    "LRScheduleConfig": "config",
    "CNNConfig": "config",
    "ReDoConfig": "config",
    "ShrinkPerturbConfig": "config",
    "ResetConfig": "config",
    "CReLU": "builders",
    "Network": "builders",
    "MLP": "builders",
    "CNN": "builders",
    "NatureCNN": "builders",
    "RMSNorm": "builders",
    "build_mlp": "builders",
    "build_cnn": "builders",
    "build_nature_cnn": "builders",
    "build_network": "builders",
    "trainable_networks": "builders",
    "named_hidden_activations": "builders",
    "GroupedMLP": "grouped",
    "GroupedLinear": "grouped",
    "GroupedNorm": "grouped",
    "build_grouped_mlp": "grouped",
    "NaP": "updates",
    "DecoupledWeightDecay": "updates",
    "LRSchedule": "updates",
    "Chain": "updates",
    "network_updates": "updates",
    "nap_project_": "updates",
    "project_to_norm_": "updates",
    "group_norm": "updates",
    "nap_initial_norms": "updates",
    "nap_groups": "updates",
    "lr_multiplier": "updates",
    "warmup_cosine_multiplier": "updates",
    "decoupled_weight_decay_": "updates",
    "ReDo": "interventions",
    "ShrinkPerturb": "interventions",
    "Reset": "interventions",
    "network_layers": "interventions",
    "fresh_parameters": "interventions",
    "redo_scores": "interventions",
    "redo_reset_": "interventions",
    "shrink_perturb_": "interventions",
    "reset_layers_": "interventions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"algorithms.networks.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'algorithms.networks' has no attribute {name!r}")
