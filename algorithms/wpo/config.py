"""WPO: Wasserstein Policy Optimization (Pfau et al., ICML 2025) on the off-policy core: its settings model
(WPOSettings), its RLlib config (WPOConfig) and the Algorithm (WPO) side by side, as RLlib keeps PPO beside
PPOConfig.

Defaults follow the reference configuration (Acme's WPO config; docs/methods.md#wpo): samples per
insert 32, N = 20 action samples, Adam lr 1e-4, batch 256, γ 0.99, 5-step returns, grad-norm clip 40,
hard target update every 100 learner steps, replay 1M, learning starts at 1000, Gaussian init scale
0.5, decoupled KL with fixed α: ε_μ 0.0025, ε_σ 1e-6, log α_μ 0, log α_σ 10 000. Learning results of
these defaults and of the sample-limited variant are in benchmarks/README.md (wpo_vs_sac.py).

Networks: with ``network`` unset, the reference architecture (policy and critic MLPs 256-256-256 with
LayerNorm + tanh after the first layer, then ELU). A spec ``network`` block replaces it for both
networks (hidden widths, norm, activation, NaP, weight decay, LR schedule all apply).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import gymnasium as gym
from pydantic import Field
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from algorithms.offpolicy.algorithm import OffPolicyAlgorithm
from algorithms.offpolicy.config import (
    LearningRate,
    NStep,
    OffPolicyConfig,
    OffPolicySettings,
    SamplesPerInsert,
    Width,
    _check,
)
from algorithms.wpo.losses import PolicyBound

Widths = Annotated[list[Width], Field(min_length=1, strict=False)]


class WPOSettings(OffPolicySettings):
    """WPO's settings and its defaults for the core's; see the module docstring for their sources."""

    MODULE_KEYS: ClassVar[tuple[str, ...]] = ("init_scale", "policy_bound", "policy_hidden", "critic_hidden",
                                             "init_log_alpha_mean", "init_log_alpha_stddev", "num_critics")

    # Acme's reference value (one update of batch 256 every 8 env steps). Sample-limited runs do better with
    # more updates at about the same compute per env step (samples_per_insert 128 with N = M = 5: arm
    # wpo_spi128_n5 in benchmarks/README.md).
    samples_per_insert: SamplesPerInsert = 32.0
    lr: LearningRate = 1e-4
    n_step: NStep = 5
    num_action_samples: int = Field(20, ge=1)
    """N: actions sampled per state for the policy loss."""
    num_target_action_samples: int = Field(20, ge=1)
    """M: target-policy actions averaged in the expected-SARSA critic target."""
    policy_lr: float | None = Field(None, gt=0)
    """Policy Adam learning rate (None: ``lr``)."""
    critic_lr: float | None = Field(None, gt=0)
    """Critic Adam learning rate (None: ``lr``)."""
    # Project addition (docs/methods.md#wpo, "Twin critics"): 2 is clipped double-Q (Fujimoto et al. 2018,
    # eq. 10) on WPO's expected-SARSA target, y = R + d·mean_m min_i Q_targ,i(s', a'_m); both critics regress
    # onto it with the one critic optimiser, and the policy follows ∇_a of the critics' mean (learner.wpo_loss
    # says why the mean, not TD3's first critic nor the min). 1 is the paper's single critic.
    num_critics: int = Field(1, ge=1, le=2)
    """Critics: 1 (the reference) or 2 (clipped double-Q target: min over the two per target action)."""
    init_scale: float = Field(0.5, gt=0)
    """Policy std at a zero pre-activation: std = softplus(x)·init_scale/softplus(0) + 1e-6."""
    epsilon_mean: float = Field(0.0025, gt=0)
    """ε_μ: KL bound of the mean (used by the dual loss and reported as kl_mean_rel)."""
    epsilon_stddev: float = Field(1e-6, gt=0)
    """ε_σ: KL bound of the std."""
    init_log_alpha_mean: float = 0.0
    """Initial log α_μ (α = softplus(log α) + 1e-8)."""
    init_log_alpha_stddev: float = 10_000.0
    """Initial log α_σ."""
    dual_learning: bool = False
    """Learn α with the MPO dual loss (the reference keeps α fixed)."""
    dual_lr: float = Field(1e-2, gt=0)
    """Adam learning rate of log α when dual_learning."""
    squash_grad_q: Literal["none", "cube_root"] = "none"
    """Squashing of ∇_a Q in the policy loss."""
    # The unsquashed Gaussian's mean otherwise drifts outside the env's bounds (losses.out_of_bounds_grad).
    action_penalty: float = Field(0.0, ge=0)
    """c: the policy follows ∇_a[Q(s, a) − c·‖a − clip(a, −1, 1)‖²] (0: the reference, no penalty)."""
    # As the reference code does (Acme's WPO critic, ``ClipToSpec``): Q outside the bounds equals Q at the
    # bound the env clips to, so ∇_a Q is zero there and the unsquashed policy mean is not pushed by critic
    # extrapolation. With ``policy_bound="tanh_squash"`` every action is inside the bounds and the clip does
    # nothing.
    critic_clip_actions: bool = True
    """Clip the action fed to the critic into [−1, 1] (false: unclipped)."""
    # How the policy respects the action bounds [−1, 1] (docs/methods.md#wpo, "Action bounds"):
    # - ``none`` (the reference, Acme's WPO): an unbounded Gaussian over a; the env clips its actions and the
    #   critic sees clip(a) (``critic_clip_actions``). ∇_a Q = 0 at every out-of-bounds sample, so a mean that
    #   drifts out gets less and less gradient and cannot come back (on DMC ``learner/policy_mean_abs`` rose
    #   from 1.2 to 4.8 in 100k steps).
    # - ``tanh_mean``: the Gaussian over a with mean tanh(μ_raw) (Acme's TF ``MultivariateNormalDiagHead``
    #   option ``tanh_mean``, used by its SVG0-prior networks). The mean cannot leave [−1, 1]; samples still
    #   can (clipped as with ``none``, and those samples still carry no gradient).
    # - ``tanh_squash``: a = tanh(u), u ~ N(μ, σ²); WPO's Gaussian update runs on u with
    #   ∇_u Q(s, tanh u) = (1 − a²) ⊙ ∇_a Q (``losses.tanh_squash_grad``), the Wasserstein flow in u-space.
    #   Every sample is inside the bounds and carries gradient, the critic is only queried where the env acts,
    #   the KL regulariser is the exact KL of the squashed policies, and the deterministic action is tanh(μ).
    #   The documented choice for DMC (experiments/wpo_dmc.yaml, as a commented alternative until
    #   benchmarked): it removes the dead zone instead of only bounding the mean, and is exact WPO for the
    #   squashed family.
    # Both tanh options pass the gradient through tanh, which saturates: ``learner/policy_mean_saturated``
    # reports the fraction of mean components with |μ_a| > 0.99.
    policy_bound: PolicyBound = "none"
    """How the policy respects the action bounds [−1, 1] (docs/methods.md#wpo, "Action bounds")."""
    policy_hidden: Widths = [256, 256, 256]
    """Policy widths of the reference architecture (ignored when ``network`` is set)."""
    critic_hidden: Widths = [256, 256, 256]
    """Critic widths of the reference architecture (ignored when ``network`` is set)."""


class WPOConfig(OffPolicyConfig):
    """WPO hyperparameters: every setting, its default, bounds and doc is a field of :class:`WPOSettings`."""

    SETTINGS: ClassVar[type[WPOSettings]] = WPOSettings

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class or WPO)

    def validate(self) -> None:
        super().validate()
        space = self.action_space
        if space is not None:
            _check(isinstance(space, gym.spaces.Box), "action_space", space, "a Box (WPO is for continuous actions)")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from algorithms.wpo.module import WPOModule

        return RLModuleSpec(module_class=WPOModule)

    def get_default_learner_class(self) -> type:
        from algorithms.wpo.learner import WPOLearner

        return WPOLearner


class WPO(OffPolicyAlgorithm):
    """Samples with VectorEnvRunner, trains WPOLearner at ``samples_per_insert`` (see algorithms.offpolicy)."""

    @classmethod
    def get_default_config(cls) -> WPOConfig:
        return WPOConfig(cls)
