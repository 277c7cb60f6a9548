"""WPOModule: diagonal Gaussian policy and scalar Q critic, built by algorithms.networks.

Reference architecture (Acme's WPO networks, docs/methods.md#wpo; used when the config's ``network`` block is unset;
settings missing from ``model_config`` fall back to :class:`~algorithms.wpo.config.WPOSettings`' defaults):
- policy: obs -> Linear(256) -> LayerNorm -> tanh -> [Linear(256) -> ELU] x 2 -> Linear(2D);
  mean = first D outputs, std = softplus(x)·init_scale/softplus(0) + 1e-6 (no tanh squashing, the
  default ``policy_bound="none"``; ``tanh_mean``: mean = tanh(first D outputs); ``tanh_squash``: the two
  halves are the Gaussian of a pre-squash u and actions are tanh(u); docs/methods.md#wpo, "Action bounds");
- critic: concat(obs, action) -> the same torso -> Linear(1); with ``num_critics`` 2 a second critic
  ``critic_2`` of the same architecture and its own initialisation (clipped double-Q, docs/methods.md#wpo).
With a ``network`` block every torso is ``build_mlp(in, out, block)``.

Targets (``target_policy``, ``target_critic``, ``target_critic_2``) are frozen copies made by the learner.
Env runners build the module with ``inference_only=True``: the policy only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from torch import Tensor, nn

from algorithms.networks.builders import build_mlp
from algorithms.networks.config import NetworkConfig
from algorithms.offpolicy.module import OffPolicyRLModule
from algorithms.wpo import losses as L
from algorithms.wpo.config import WPOSettings

_SOFTPLUS_0 = math.log(2.0)


def reference_mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    """Acme's LayerNorm MLP through our builders: Linear -> LayerNorm -> tanh, then Linear -> ELU blocks, then out."""
    first = build_mlp(in_dim, None, NetworkConfig(hidden=hidden[:1], norm="layer", activation="tanh"))
    rest = build_mlp(hidden[0], out_dim, NetworkConfig(hidden=list(hidden[1:]), activation="elu"))
    return nn.Sequential(first, rest)


def make_mlp(in_dim: int, out_dim: int, block: NetworkConfig | None, hidden: list[int]) -> nn.Module:
    return build_mlp(in_dim, out_dim, block) if block is not None else reference_mlp(in_dim, hidden, out_dim)


class GaussianPolicy(nn.Module):
    """obs [..., O] -> (mean [..., D], std [..., D]) of the policy's Gaussian; std = softplus(x)·init_scale/softplus(0) + 1e-6.

    ``bound`` (WPOConfig.policy_bound): ``none``: mean = x (the reference); ``tanh_mean``: mean = tanh(x),
    a Gaussian over a whose mean stays in [−1, 1]; ``tanh_squash``: (mean, std) of the pre-squash u, the
    action is ``to_action(u)`` = tanh(u). ``to_action`` maps a Gaussian sample or the mean to action space.
    """

    def __init__(self, net: nn.Module, action_dim: int, init_scale: float, bound: str = "none"):
        super().__init__()
        if bound not in L.POLICY_BOUNDS:
            raise ValueError(f"policy_bound: got {bound!r}; allowed: {', '.join(L.POLICY_BOUNDS)}")
        self.net = net
        self.action_dim = action_dim
        self.init_scale = init_scale
        self.bound = bound

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(obs)
        mean, pre_std = out[..., : self.action_dim], out[..., self.action_dim :]
        if self.bound == "tanh_mean":
            mean = torch.tanh(mean)
        std = F.softplus(pre_std) * (self.init_scale / _SOFTPLUS_0) + 1e-6
        return mean, std

    def to_action(self, x: Tensor) -> Tensor:
        """Action for a Gaussian sample or mean x: tanh(x) with ``tanh_squash``, else x."""
        return L.to_action(x, self.bound)


class QCritic(nn.Module):
    """(obs [..., O], action [..., D]) -> Q [...]."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


CRITICS = ("critic", "critic_2")
"""Attribute names of the critics, in order; a module holds the first ``num_critics`` of them."""


class WPOModule(OffPolicyRLModule):
    """Policy (``policy``), critic(s) (``critic``, ``critic_2`` with ``num_critics`` 2; learner only) and the KL
    weights' log α (learner only)."""

    TARGET_NETWORKS = ("policy", *CRITICS)  # critic_2 gets a target only where it is built
    LEARNER_ONLY = (*CRITICS, "log_alpha_mean", "log_alpha_stddev")

    def setup(self) -> None:
        mc: dict[str, Any] = WPOSettings.module_config(self.model_config)
        obs_dim = int(self.observation_space.shape[0])
        act_dim = int(self.action_space.shape[0])
        if len(self.observation_space.shape) != 1:
            raise ValueError(f"WPO: observations must be flat vectors [D], got shape {self.observation_space.shape}")
        block = self.network_config
        self.policy = GaussianPolicy(make_mlp(obs_dim, 2 * act_dim, block, list(mc["policy_hidden"])),
                                     act_dim, float(mc["init_scale"]), str(mc["policy_bound"]))
        if not self.inference_only:
            for name in CRITICS[: int(mc["num_critics"])]:
                setattr(self, name, QCritic(make_mlp(obs_dim + act_dim, 1, block, list(mc["critic_hidden"]))))
            self.log_alpha_mean = nn.Parameter(torch.tensor(float(mc["init_log_alpha_mean"])))
            self.log_alpha_stddev = nn.Parameter(torch.tensor(float(mc["init_log_alpha_stddev"])))

    def act(self, obs: Tensor, *, explore: bool, generator: torch.Generator | None) -> Tensor:
        """Sampled (explore) or deterministic actions: the Gaussian's sample / mean mapped by ``to_action``
        (tanh(u) / tanh(μ_u) with ``tanh_squash``, so every action is inside [−1, 1])."""
        mean, std = self.policy(obs.float())
        if not explore:
            return self.policy.to_action(mean)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.policy.to_action(mean + std * noise)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """[mean, log std] of the policy's Gaussian (of u with ``tanh_squash``: a KL between two of them is
        the KL between the squashed policies, so the convergence diagnostic reads it unchanged)."""
        mean, std = self.policy(batch[Columns.OBS].float())
        return {Columns.ACTION_DIST_INPUTS: torch.cat([mean, std.log()], dim=-1)}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {}  # the learner calls the networks it needs (several forwards per loss)

    def critics(self) -> tuple[QCritic, ...]:
        """The online critics, ``(critic,)`` or ``(critic, critic_2)``; empty on an inference-only module."""
        return tuple(getattr(self, name) for name in CRITICS if hasattr(self, name))

    def target_critics(self) -> tuple[nn.Module, ...]:
        """Their target copies, in the same order (made by the learner)."""
        return tuple(getattr(self, "target_" + name) for name in CRITICS if hasattr(self, "target_" + name))

    def plasticity_probe_forward(self, batch: dict[str, Any]) -> Tensor:
        """Probe forward for the plasticity diagnostic: policy on obs, every critic at the policy mean (so each
        critic's activation layers are reported); returns Q [C, B] (the policy mean [B, D] without critics)."""
        obs = batch[Columns.OBS].float()
        mean = self.policy.to_action(self.policy(obs)[0])
        critics = self.critics()
        return torch.stack([critic(obs, mean) for critic in critics]) if critics else mean
