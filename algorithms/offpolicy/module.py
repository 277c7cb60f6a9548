"""OffPolicyRLModule: the RLModule contract of the off-policy core.

A subclass builds its networks in ``setup()`` (with :mod:`algorithms.networks`; ``self.network_config``
is the config's ``network`` block or None) and implements:

- ``act(obs, *, explore, generator) -> actions``: actions for a batch of observations [E, ...] on the
  env runners; all randomness from ``generator`` (a seeded ``torch.Generator`` owned by the runner),
  so sampling is reproducible and restorable.
- ``_forward(batch)``: RLlib's generic forward (used by ``forward_inference`` / ``forward_train``).

Class attributes declare the network roles:

- ``TARGET_NETWORKS``: attribute names of networks that get a frozen target copy ``target_<name>``
  (RLlib's TargetNetworkAPI; the learner makes the copies once built and updates them every
  ``target_update_period`` updates with ``target_update_tau``). A name the module did not build (an
  optional network, e.g. WPO's second critic with ``num_critics`` 1) gets no target.
- ``LEARNER_ONLY``: attribute names not needed for acting (e.g. a critic); env runners build the
  module with ``inference_only=True`` and weight syncs leave these (and the targets) out.

Extra state that acting needs (e.g. EVE's diagonal Fisher) can be a registered buffer: it is part of
``state_dict`` and so reaches the env runners with every weight sync.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI, TargetNetworkAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import Tensor

from algorithms.networks.config import NetworkConfig

TARGET_PREFIX = "target_"


class OffPolicyRLModule(TorchRLModule, TargetNetworkAPI, InferenceOnlyAPI):
    """Base RLModule of algorithms on the off-policy core (see the module docstring)."""

    TARGET_NETWORKS: ClassVar[tuple[str, ...]] = ()
    LEARNER_ONLY: ClassVar[tuple[str, ...]] = ()

    @property
    def network_config(self) -> NetworkConfig | None:
        """The ``network`` block from ``model_config["network"]`` (a NetworkConfig, dict or None)."""
        block = (self.model_config or {}).get("network") if isinstance(self.model_config, dict) else None
        if block is None or isinstance(block, NetworkConfig):
            return block
        return NetworkConfig.model_validate(block)

    def act(self, obs: Tensor, *, explore: bool, generator: torch.Generator | None) -> Tensor:
        """Actions [E, ...] for observations [E, ...]; randomness only from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement act(obs, explore=, generator=)")

    # -- TargetNetworkAPI ------------------------------------------------------------------------
    def make_target_networks(self) -> None:
        for name in self.TARGET_NETWORKS:
            if hasattr(self, name):  # optional networks a configuration leaves out have no target
                setattr(self, TARGET_PREFIX + name, make_target_network(getattr(self, name)))

    def get_target_network_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(getattr(self, n), getattr(self, TARGET_PREFIX + n)) for n in self.TARGET_NETWORKS
                if hasattr(self, TARGET_PREFIX + n)]

    def forward_target(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}: the learner calls the target networks directly")

    # -- InferenceOnlyAPI --------------------------------------------------------------------------
    def get_non_inference_attributes(self) -> list[str]:
        return list(self.LEARNER_ONLY) + [TARGET_PREFIX + n for n in self.TARGET_NETWORKS]


@torch.no_grad()
def update_target_networks(pairs: list[tuple[torch.nn.Module, torch.nn.Module]], tau: float) -> None:
    """θ_targ ← τ·θ + (1 − τ)·θ_targ for every (online, target) pair (τ = 1: hard copy). Buffers are copied.

    Polyak averaging as in DDPG (Lillicrap et al. 2016); τ = 1 every N updates is DQN's periodic copy
    (Mnih et al. 2015), which WPO's reference uses with N = 100.
    """
    for online, target in pairs:
        for p_t, p in zip(target.parameters(), online.parameters()):
            if tau >= 1.0:
                p_t.copy_(p)
            else:
                p_t.lerp_(p, tau)
        for b_t, b in zip(target.buffers(), online.buffers()):
            b_t.copy_(b)
