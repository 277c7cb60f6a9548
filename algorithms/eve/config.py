"""EVE: epistemic Q-learning (Schmitt, Shawe-Taylor, van Hasselt, AAAI 2023, arXiv 2303.04012) on the
off-policy core, and its epsilon-greedy baseline (the same implementation with
``exploration="epsilon_greedy"`` instead of ``"posterior"``, so only exploration differs).

Method (docs/methods.md#eve): value prediction as return density N(G; Q_θ(s, a), σ²) (``noise_var`` σ²),
a running diagonal Fisher of ∇_θQ (EMA with ``fisher_decay``), the posterior N(θ̂, (N·diag F + λ)⁻¹)
with N the transitions seen and λ = ``prior_precision``, and Thompson sampling of a parameter
perturbation per episode (``resample``) on each env runner; target network, replay, Adam, burn-in
(``learning_starts`` env steps of uniformly random actions before the first update).

Defaults: one update per 2 env steps (``samples_per_insert`` 16, batch 32), Adam 1e-3, no gradient
clipping, hard target update every 50 updates, burn-in 100 env steps, σ² = 0.001 (tuned on deep_sea size
10 with a plain-torch replica of this loop). The network and exploration defaults are the combination that
solved every bsuite deep_sea size 10-30 with one network: one MLP [64] per action (``q_heads="per_action"``)
with LayerNorm and ELU (``norm="layer"``, ``activation="elu"``), λ = 0.1 (``prior_precision``), linearised
posterior samples for acting and for the bootstrap targets, bootstrap targets that are the Q-learning
targets of the posterior sample (``target_argmax="sample"``: the sampled values also pick the bootstrap
action, so the targets carry the next state's uncertainty back as optimism; see algorithms.eve.learner),
and each sampled value's perturbation clipped to ±1 (``target_noise_clip``). Why each piece: ELU and
LayerNorm keep hidden units active at unvisited states, so posterior noise reaches them; a small λ leaves
the parameters the data has not pinned down uncertain; separate towers keep one action's uncertainty from
moving every action's value alike; the clip bounds the optimism of barely visited states so the values
settle once those states are visited. Episode counts per size and seed, the ablation of each piece and
throughput against the baseline and RLlib DQN: benchmarks/README.md, section ``eve_deep_sea.py``.

Deviations from the paper, each documented where it acts: acting and bootstrapping use the linearised
posterior sample Q_θ̂ + ∇_θQᵀδ (``perturbation="linearised"``; ``"parameters"`` perturbs the weights
themselves), the sampled values pick the bootstrap action (``target_argmax``), the targets' perturbation
is clipped (``target_noise_clip``), and the Q network has one tower per action (``q_heads``; still one
network with one posterior and one sample per episode, not an ensemble; ``q_heads="shared"`` gives the
paper's single MLP with A outputs). The towers run as one grouped network (one matrix product per layer,
:func:`algorithms.networks.build_grouped_mlp`), and the learner gets the Fisher and the loss gradient from one
hand-written reverse pass (docs/methods.md#eve).

Here: the settings model (EVESettings), the RLlib config (EVEConfig) and the Algorithm (EVE) side by side, as
RLlib keeps PPO beside PPOConfig. One EVE iteration is the core's ``training_step`` (sample with
:class:`~algorithms.eve.env_runner.EVEEnvRunner`, insert, update at ``samples_per_insert``, sync weights, with
the Fisher buffers, to the runners) plus the learner's uncertainty report as ``uncertainty/...`` result keys:
``uncertainty/q_epistemic_std`` (mean over replay states of the Delta-Variance std of Q at the greedy action;
also ``_max``, ``_min``), ``uncertainty/posterior_std_{mean,min,max}``, ``uncertainty/fisher_mean`` and
``uncertainty/num_data`` (N). Only with exploration="posterior".
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import gymnasium as gym
from pydantic import Field
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from algorithms.eve.env_runner import EVEEnvRunner
from algorithms.networks.config import Activation, Norm
from algorithms.offpolicy.algorithm import OffPolicyAlgorithm
from algorithms.offpolicy.config import (
    BatchSize,
    GradClip,
    LearningRate,
    LearningStarts,
    OffPolicyConfig,
    OffPolicySettings,
    ReplayCapacity,
    RolloutFragment,
    SamplesPerInsert,
    TargetUpdatePeriod,
    Width,
    _check,
)

UNCERTAINTY = "uncertainty"
Probability = Annotated[float, Field(ge=0, le=1)]


class EVESettings(OffPolicySettings):
    """EVE's settings and its defaults for the core's; see the module docstring."""

    MODULE_KEYS: ClassVar[tuple[str, ...]] = ("hidden", "activation", "norm", "q_heads")

    # One update per 2 env steps (samples_per_insert 16, batch 32), no gradient clipping, burn-in 100 env steps.
    rollout_fragment_length: RolloutFragment = 1
    train_batch_size_per_learner: BatchSize = 32
    lr: LearningRate = 1e-3
    grad_clip: GradClip = None
    samples_per_insert: SamplesPerInsert = 16.0
    replay_capacity: ReplayCapacity = 100_000
    learning_starts: LearningStarts = 100
    target_update_period: TargetUpdatePeriod = 50
    hidden: Annotated[list[Width], Field(strict=False)] = [64]
    """Q network widths (ignored when the spec's ``network`` block is set)."""
    # ELU, not ReLU: on deep_sea's one-hot inputs ReLU units die, and a dead unit passes no posterior noise, so
    # the epistemic spread collapses; ELU's derivative below zero is exp(x) > 0 (measurements:
    # benchmarks/README.md, eve_deep_sea.py).
    activation: Activation = "elu"
    """Hidden activation of the Q network (ignored when the spec's ``network`` block is set)."""
    # LayerNorm keeps ~47% of the units active at unvisited deep_sea cells; without it the shared first-layer
    # bias, trained by every visited cell, pushed the unvisited cells' ELU units negative and their noise away.
    norm: Norm = "layer"
    """Normalisation before each hidden activation of the Q network, then no hidden bias (ignored with ``network``)."""
    double_q: bool = True
    """Double Q-learning targets (argmax by the online network, value by the target)."""
    noise_var: float = Field(0.001, gt=0)
    """σ²: variance of the return density N(G; Q_θ(s, a), σ²)."""
    # It only matters for parameters the data has not pinned down (e.g. the input weights of unvisited states).
    prior_precision: float = Field(0.1, gt=0)
    """λ: damping of the posterior precision N·diag F + λ (a Gaussian prior's precision)."""
    fisher_decay: float = Field(0.999, ge=0, lt=1)
    """β of the running (EMA, bias-corrected) diagonal Fisher estimate."""
    # posterior: EVE, greedy on a posterior sample θ̃; epsilon_greedy: the baseline, ε-greedy on θ̂; greedy: on θ̂.
    exploration: Literal["posterior", "epsilon_greedy", "greedy"] = "posterior"
    """How the env runners act (the learner tracks the Fisher only for posterior)."""
    posterior_scale: float = Field(1.0, ge=0)
    """Multiplies the posterior std of the samples (1 = the posterior; 0 = greedy on θ̂)."""
    resample: Literal["episode", "steps"] = "episode"
    """When θ̃ is redrawn: when an env's episode starts, or every resample_every env steps."""
    # linearised: act on Q_θ̂ + ∇_θQᵀ(θ̃ − θ̂), the Delta-Variance Gaussian; parameters: on Q_θ̃ itself.
    perturbation: Literal["linearised", "parameters"] = "linearised"
    """How a posterior sample perturbs Q (linearised: the Delta-Variance Gaussian; parameters: the weights)."""
    resample_every: int = Field(1, ge=1)
    """k for resample='steps'."""
    epsilon_initial: Probability = 1.0
    """ε at the first env step (exploration='epsilon_greedy')."""
    epsilon_final: Probability = 0.05
    """ε after epsilon_timesteps env steps."""
    epsilon_timesteps: int = Field(1000, ge=0)
    """ε anneals linearly from epsilon_initial to epsilon_final over this many env steps (per runner)."""
    target_sampling: bool = True
    """With exploration='posterior': bootstrap from a linearised posterior sample of the target network, per update."""
    # sample: the posterior sample's (Q_θ̂ + J δ of the online net, with the target's draw δ); mean: Q_θ̂
    # (zero-mean target noise). See algorithms.eve.learner.
    target_argmax: Literal["sample", "mean"] = "sample"
    """With target_sampling and double_q: which values pick the bootstrap action."""
    # Bounds the optimism a barely visited next state adds to a target (E[max] of the noisy values), so
    # inflated values wash out once the states are visited; set it on the scale of the rewards (bsuite's are
    # within [-1, 1]). Default 1: without it per-action heads inflated deep_sea's values far above their true
    # range (benchmarks/README.md, eve_deep_sea.py).
    target_noise_clip: float | None = Field(1.0, gt=0)
    """With target_sampling: clip each sampled value's perturbation J δ to [-c, c] in the targets (None: no clip)."""
    # per_action: the posterior noise of different actions' values is independent, so the gap between them
    # keeps the spread of each; with a shared torso the perturbations of a hidden unit move every action's
    # value alike.
    q_heads: Literal["shared", "per_action"] = "per_action"
    """shared: one MLP with A outputs; per_action: A separate MLPs with one output each."""
    uncertainty_batch_size: int = Field(64, ge=1)
    """Replay states on which the epistemic std of Q (a Delta Variance) is reported each iteration."""


class EVEConfig(OffPolicyConfig):
    """EVE hyperparameters: every setting, its default, bounds and doc is a field of :class:`EVESettings`."""

    SETTINGS: ClassVar[type[EVESettings]] = EVESettings

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or EVE)
        self.env_runner_cls = EVEEnvRunner

    def validate(self) -> None:
        super().validate()
        if self.action_space is not None:
            _check(isinstance(self.action_space, gym.spaces.Discrete), "action_space", self.action_space,
                   "a Discrete space (EVE's Q-learning is for discrete actions)")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from algorithms.eve.module import EVEModule

        return RLModuleSpec(module_class=EVEModule)

    def get_default_learner_class(self) -> type:
        from algorithms.eve.learner import EVELearner

        return EVELearner


class EVE(OffPolicyAlgorithm):
    """Epistemic Q-learning (exploration="posterior") or its ε-greedy baseline; see the module docstring."""

    @classmethod
    def get_default_config(cls) -> EVEConfig:
        return EVEConfig(cls)

    def training_step(self) -> None:
        super().training_step()
        stats = [r.get() for r in self.learner_group.foreach_learner(lambda learner: learner.uncertainty_stats())]
        for name, value in (stats[0] if stats else {}).items():
            self.metrics.log_value((UNCERTAINTY, name), value, window=1)
