"""RLlib adapters (new API stack): RLModules for RLlib's own PPO and DQN built by our builders, and a
learner mixin that applies the network block's update pieces inside any TorchLearner.

The spec's ``config.network`` block reaches these through ``model_config["network"]`` (a dict that
:class:`~algorithms.networks.config.NetworkConfig` validates); :mod:`algorithms.networks.block` sets
the module and learner classes on an RLlib AlgorithmConfig.

Modules (heads are plain ``nn.Linear`` output layers, never projected by NaP):

- :class:`NetworkPPOTorchRLModule`: ``encoder.actor_encoder`` and ``encoder.critic_encoder`` are
  :class:`~algorithms.networks.builders.Network` torsos (one shared torso if ``vf_share_layers``),
  ``pi`` and ``vf`` linear heads. MLP for flat observations, CNN for [H, W, C] images.
- :class:`NetworkDQNTorchRLModule`: ``encoder.torso`` a Network torso, ``af`` (and ``vf`` if dueling)
  linear heads; RLlib makes the target copies (frozen, so NaP skips them).

Learner mixin (:class:`NetworkLearnerMixin`), per module whose model_config carries a network block
(or, for our own algorithms, whose AlgorithmConfig has a ``network`` attribute):

- after every optimiser step (``apply_gradients``): decoupled weight decay, the plasticity interventions
  (resets, Shrink & Perturb, ReDo; :mod:`algorithms.networks.interventions`, each on its own ``every``),
  then NaP projection every ``nap_every`` optimiser steps;
- before every update call (``before_gradient_based_update``): lr = base_lr · m(t) with t the env steps
  sampled so far (RLlib's schedule unit; ``lr_schedule.task_length`` is in env steps). RLlib's own
  lr scheduler for that optimiser is removed so the logged ``..._lr`` is the scheduled value;
- ``after_gradient_based_update`` logs ``network_nap_projections`` and the max relative deviation of
  NaP groups from their initial norms (``network_nap_max_norm_deviation``; 0 right after projection), and
  the interventions' lifetime counters ``network_redo_units_reset``, ``network_redo_firings``,
  ``network_redo_dormant_fraction`` (at the last firing), ``network_shrink_perturb_applications``,
  ``network_resets``;
- the modules declare the heads that read their torsos (``network_heads``), so ReDo zeroes the heads'
  outgoing weights of recycled last-layer units and resets count the heads as the last layer;
- the pieces' state (initial norms, L2-Init references, step count) is part of the learner state
  (key ``network_updates``) so a restored learner keeps projecting to the *original* norms.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.rllib.utils.schedules.scheduler import Scheduler
from torch import nn

from algorithms.networks.builders import Network, build_network
from algorithms.networks.config import LRScheduleConfig, NetworkConfig
from algorithms.networks.updates import Chain, LRSchedule, NaP, group_norm, nap_groups, network_updates
from algorithms.ray_compat import action_dist_cls


def network_config_from(model_config: Any) -> NetworkConfig:
    """The validated network block inside an RLModule's ``model_config`` (defaults when absent)."""
    mc = _as_dict(model_config)
    block = mc.get("network")
    if isinstance(block, NetworkConfig):
        return block
    return NetworkConfig.model_validate(block or {})


def _as_dict(model_config: Any) -> dict:
    if model_config is None:
        return {}
    if dataclasses.is_dataclass(model_config):
        return dataclasses.asdict(model_config)
    return dict(model_config)


def _obs_shape(space) -> tuple[int, ...]:
    shape = getattr(space, "shape", None)
    if not shape:
        raise ValueError(
            f"network: observation space {space} is not supported; a Box with shape [D] or [H, W, C] is needed"
        )
    return tuple(int(s) for s in shape)


class ActorCriticTorso(nn.Module):
    """Actor torso and (unless shared or inference-only) critic torso, both :class:`Network` s."""

    def __init__(self, obs_shape: tuple[int, ...], cfg: NetworkConfig, *, shared: bool, with_critic: bool):
        super().__init__()
        self.actor_encoder = build_network(obs_shape, None, cfg)
        self.critic_encoder = build_network(obs_shape, None, cfg) if with_critic and not shared else None
        self.shared = shared

    @property
    def out_features(self) -> int:
        return self.actor_encoder.out_features

    def actor(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_encoder(obs)

    def critic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_encoder(obs) if self.shared else self.critic_encoder(obs)


class NetworkPPOTorchRLModule(DefaultPPOTorchRLModule):
    """RLlib's PPO module with its encoder and heads replaced by our networks (model_config["network"])."""

    def setup(self) -> None:
        cfg = network_config_from(self.model_config)
        mc = _as_dict(self.model_config)
        obs_shape = _obs_shape(self.observation_space)
        if self.action_dist_cls is None:  # the catalog may reject obs shapes our builders handle
            self.action_dist_cls = action_dist_cls(self.action_space)
        out_dim = int(self.action_dist_cls.required_input_dim(space=self.action_space, model_config=mc))
        self.vf_share_layers = bool(mc.get("vf_share_layers", False))
        self.encoder = ActorCriticTorso(
            obs_shape, cfg, shared=self.vf_share_layers, with_critic=not self.inference_only
        )
        self.pi = nn.Linear(self.encoder.out_features, out_dim)
        if not self.inference_only:
            self.vf = nn.Linear(self.encoder.out_features, 1)

    def get_initial_state(self) -> dict:
        return {}

    def network_heads(self) -> dict[str, list[str]]:
        """The heads reading each torso's features (algorithms.networks.interventions.network_layers)."""
        has_vf = hasattr(self, "vf")
        if self.vf_share_layers:
            return {"encoder.actor_encoder": ["pi"] + (["vf"] if has_vf else [])}
        heads = {"encoder.actor_encoder": ["pi"]}
        if self.encoder.critic_encoder is not None and has_vf:
            heads["encoder.critic_encoder"] = ["vf"]
        return heads

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.pi(self.encoder.actor(batch[Columns.OBS]))}

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        obs = batch[Columns.OBS]
        features = self.encoder.actor(obs)
        return {
            Columns.ACTION_DIST_INPUTS: self.pi(features),
            Columns.EMBEDDINGS: features if self.vf_share_layers else self.encoder.critic(obs),
        }

    def compute_values(self, batch: dict[str, Any], embeddings: Any | None = None) -> torch.Tensor:
        if embeddings is None:
            embeddings = self.encoder.critic(batch[Columns.OBS])
        return self.vf(embeddings).squeeze(-1)


class ObservationTorso(nn.Module):
    """RLlib encoder interface around a :class:`Network` torso: batch -> {ENCODER_OUT: features}."""

    def __init__(self, torso: Network):
        super().__init__()
        self.torso = torso

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {ENCODER_OUT: self.torso(batch[Columns.OBS])}


class NetworkDQNTorchRLModule(DefaultDQNTorchRLModule):
    """RLlib's DQN module with its encoder and heads replaced by our networks (model_config["network"])."""

    def setup(self) -> None:
        cfg = network_config_from(self.model_config)
        mc = _as_dict(self.model_config)
        self.uses_dueling = bool(mc.get("dueling"))
        self.uses_double_q = bool(mc.get("double_q"))
        self.num_atoms = int(mc.get("num_atoms", 1))
        if self.num_atoms > 1:
            self.v_min = mc.get("v_min")
            self.v_max = mc.get("v_max")
        self.epsilon_schedule = Scheduler(fixed_value_or_schedule=mc["epsilon"], framework=self.framework)
        if self.action_dist_cls is None:
            self.action_dist_cls = action_dist_cls(self.action_space)
        torso = build_network(_obs_shape(self.observation_space), None, cfg)
        self.encoder = ObservationTorso(torso)
        self.af = nn.Linear(torso.out_features, int(self.action_space.n) * self.num_atoms)
        if self.uses_dueling:
            self.vf = nn.Linear(torso.out_features, 1)

    def get_initial_state(self) -> dict:
        return {}

    def network_heads(self) -> dict[str, list[str]]:
        """The heads reading the torso's features (algorithms.networks.interventions.network_layers)."""
        return {"encoder.torso": ["af"] + (["vf"] if self.uses_dueling else [])}


# --------------------------------------------------------------------------------------------------
# Learner mixin
# --------------------------------------------------------------------------------------------------

NETWORK_UPDATES_STATE = "network_updates"


class NetworkLearnerMixin:
    """Apply the network block's NaP, decoupled weight decay, LR schedule and plasticity interventions
    (ReDo, Shrink & Perturb, resets) inside a TorchLearner.

    Put it first in the bases: ``class MyLearner(NetworkLearnerMixin, PPOTorchLearner)``. Override
    :meth:`network_config_for_module` to take the block from elsewhere.
    """

    def network_config_for_module(self, module_id: str) -> NetworkConfig | None:
        """The block for ``module_id``: its model_config["network"], else the AlgorithmConfig's ``network``."""
        module = self.module[module_id].unwrapped()
        block = _as_dict(getattr(module, "model_config", None)).get("network")
        if block is None:
            block = getattr(self.config.get_config_for_module(module_id), "network", None)
        if block is None:
            return None
        return block if isinstance(block, NetworkConfig) else NetworkConfig.model_validate(block)

    def _optimizers_of(self, module_id: str) -> list[torch.optim.Optimizer]:
        return [opt for _, opt in self.get_optimizers_for_module(module_id)]

    def build(self) -> None:
        super().build()
        self._net_updates: dict[str, Chain] = {}
        self._net_schedules: dict[str, LRSchedule] = {}
        self._net_steps: dict[str, int] = {}
        for mid in list(self.module.keys()):
            cfg = self.network_config_for_module(mid)
            if cfg is None:
                continue
            module = self.module[mid].unwrapped()
            optims = self._optimizers_of(mid)
            # The schedule runs on env steps here, so it is kept out of the per-optimiser-step chain.
            chain = network_updates(cfg.model_copy(update={"lr_schedule": LRScheduleConfig()}))
            chain.init(module, optims)
            self._net_updates[mid] = chain
            self._net_steps[mid] = 0
            if cfg.lr_schedule.kind != "constant":
                schedule = LRSchedule(cfg.lr_schedule)
                schedule.init(module, optims)
                for opt in optims:
                    self._optimizer_lr_schedules.pop(opt, None)
                schedule.set_lr(optims, 0)
                self._net_schedules[mid] = schedule

    def before_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        t = int(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0)
        for mid, schedule in self._net_schedules.items():
            schedule.set_lr(self._optimizers_of(mid), t)

    def apply_gradients(self, gradients_dict: dict) -> None:
        super().apply_gradients(gradients_dict)
        for mid, chain in self._net_updates.items():
            chain.after_step(self.module[mid].unwrapped(), self._optimizers_of(mid), self._net_steps[mid])
            self._net_steps[mid] += 1

    def after_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        for mid, chain in self._net_updates.items():
            for name, value in chain.metrics().items():
                self.metrics.log_value((mid, f"network_{name}"), value, window=1)
            nap = chain.find(NaP)
            if nap is None:
                continue
            groups = nap_groups(self.module[mid].unwrapped())
            deviation = max(
                (abs(float(group_norm(ps)) / nap.init_norms[name] - 1.0) for name, ps in groups.items()),
                default=0.0,
            )
            self.metrics.log_value((mid, "network_nap_max_norm_deviation"), deviation, window=1)
            self.metrics.log_value((mid, "network_nap_projections"), self._net_steps[mid] // nap.every, window=1)

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(NETWORK_UPDATES_STATE, components, not_components):
            state[NETWORK_UPDATES_STATE] = {
                mid: {"chain": chain.state_dict(), "steps": self._net_steps[mid]}
                for mid, chain in self._net_updates.items()
            }
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        for mid, s in state.get(NETWORK_UPDATES_STATE, {}).items():
            if mid in self._net_updates:
                self._net_updates[mid].load_state_dict(s["chain"])
                self._net_steps[mid] = s["steps"]

    def network_updates_for(self, module_id: str) -> Chain | None:
        """The chain (weight decay, NaP) applied to ``module_id`` (None without a network block)."""
        return self._net_updates.get(module_id)


class NetworkPPOTorchLearner(NetworkLearnerMixin, PPOTorchLearner):
    """RLlib's PPO torch learner with the network block's NaP / weight decay / LR schedule."""


class NetworkDQNTorchLearner(NetworkLearnerMixin, DQNTorchLearner):
    """RLlib's DQN torch learner with the network block's NaP / weight decay / LR schedule."""
