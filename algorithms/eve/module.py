"""EVEModule: the Q network (built by algorithms.networks) and the posterior state acting needs.

- ``q``: obs [B, D] -> Q_θ(s, ·) [B, A], an MLP from the spec's ``network`` block (image observations:
  the block's conv encoder with A outputs, e.g. ``encoder: nature_cnn`` on ``ale/<Game>``; they need
  ``q_heads="shared"`` and ``exploration="epsilon_greedy"`` or ``"greedy"``, the posterior's Fisher pass
  being written for MLPs), else
  ``build_mlp(D, A, NetworkConfig(hidden=config.hidden, activation=config.activation, norm=config.norm))``
  (settings missing from ``model_config`` fall back to :class:`~algorithms.eve.config.EVESettings`' defaults);
  with ``q_heads="per_action"`` A such MLPs with one output each, Q(s, a) = net_a(s), sharing no parameter
  (so a diagonal posterior perturbs each action's value independently), run as one grouped network
  (:func:`algorithms.networks.build_grouped_mlp`: one matrix product per layer for all actions);
  ``target_q`` is its frozen copy (made by the learner, updated every ``target_update_period`` updates).
- Buffers ``fisher_diag`` [P] (the running diagonal Fisher of ∇_θQ, flat in ``q.named_parameters()``
  order) and ``num_data`` (N, transitions seen): written by the learner after each update, so they
  reach the env runners with every weight sync and the runners can sample θ̃ ~ N(θ̂, (N·diag F + λ)⁻¹).
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.columns import Columns
from torch import Tensor

from algorithms.eve.config import EVESettings
from algorithms.eve.exploration import greedy_actions
from algorithms.networks.builders import build_mlp, build_network
from algorithms.networks.config import NetworkConfig
from algorithms.networks.grouped import build_grouped_mlp
from algorithms.offpolicy.module import OffPolicyRLModule


class EVEModule(OffPolicyRLModule):
    """Q network ``q`` (+ ``target_q`` on the learner) and the buffers ``fisher_diag``, ``num_data``."""

    TARGET_NETWORKS = ("q",)
    LEARNER_ONLY = ()

    def setup(self) -> None:
        mc: dict[str, Any] = EVESettings.module_config(self.model_config)
        shape = self.observation_space.shape
        if shape is None or len(shape) not in (1, 3):
            raise ValueError(f"EVE: observations must be flat vectors [D] or images, got shape {shape}")
        if not hasattr(self.action_space, "n"):
            raise ValueError(f"EVE: the action space must be Discrete, got {self.action_space}")
        block = self.network_config or NetworkConfig(hidden=list(mc["hidden"]), activation=str(mc["activation"]),
                                                      norm=str(mc["norm"]))
        if len(shape) == 3:
            if mc.get("q_heads", "shared") != "shared":
                raise ValueError(f"EVE: image observations {tuple(shape)} need q_heads='shared' (one conv torso "
                                 f"with A outputs); got q_heads={mc.get('q_heads')!r}")
            self.q = build_network(tuple(int(d) for d in shape), int(self.action_space.n), block)
        elif mc["q_heads"] == "per_action":
            self.q = build_grouped_mlp(int(shape[0]), int(self.action_space.n), 1, block)
        else:
            self.q = build_mlp(int(shape[0]), int(self.action_space.n), block)
        num_params = sum(p.numel() for p in self.q.parameters())
        self.register_buffer("fisher_diag", torch.zeros(num_params))
        self.register_buffer("num_data", torch.zeros((), dtype=torch.float64))

    def q_values(self, obs: Tensor) -> Tensor:
        return self.q(obs.float())

    def act(self, obs: Tensor, *, explore: bool, generator: torch.Generator | None) -> Tensor:
        """Greedy actions on θ̂ (exploration lives in :class:`algorithms.eve.env_runner.EVEEnvRunner`)."""
        return greedy_actions(self.q_values(obs))

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # The learner runs Q's forward pass itself (hooked, so it also yields per-example gradients).
        return {}

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        q = self.q_values(batch[Columns.OBS])
        return {"q_values": q, Columns.ACTIONS: greedy_actions(q)}
