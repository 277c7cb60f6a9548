"""WPOConfig: Wasserstein Policy Optimization on the off-policy core.

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

from typing import Any

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from algorithms.offpolicy.config import OffPolicyConfig, _check


class WPOConfig(OffPolicyConfig):
    """WPO hyperparameters; see the module docstring for their sources."""

    def __init__(self, algo_class: type | None = None):
        from algorithms.wpo.algorithm import WPO

        super().__init__(algo_class=algo_class or WPO)
        self.samples_per_insert = 32.0
        # Acme's reference value (one update of batch 256 every 8 env steps). Sample-limited runs do
        # better with more updates at about the same compute per env step (samples_per_insert 128 with
        # N = M = 5: arm wpo_spi128_n5 in benchmarks/README.md).
        self.lr = 1e-4
        self.train_batch_size_per_learner = 256
        self.gamma = 0.99
        self.n_step = 5
        self.grad_clip = 40.0
        self.target_update_period = 100
        self.target_update_tau = 1.0
        self.replay_capacity = 1_000_000
        self.learning_starts = 1000
        self.num_action_samples: int = 20
        """N: actions sampled per state for the policy loss."""
        self.num_target_action_samples: int = 20
        """M: target-policy actions averaged in the expected-SARSA critic target."""
        self.policy_lr: float | None = None
        """Policy Adam learning rate (None: ``lr``)."""
        self.critic_lr: float | None = None
        """Critic Adam learning rate (None: ``lr``)."""
        self.init_scale: float = 0.5
        """Policy std at a zero pre-activation: std = softplus(x)·init_scale/softplus(0) + 1e-6."""
        self.epsilon_mean: float = 0.0025
        """ε_μ: KL bound of the mean (used by the dual loss and reported as kl_mean_rel)."""
        self.epsilon_stddev: float = 1e-6
        """ε_σ: KL bound of the std."""
        self.init_log_alpha_mean: float = 0.0
        """Initial log α_μ (α = softplus(log α) + 1e-8)."""
        self.init_log_alpha_stddev: float = 10_000.0
        """Initial log α_σ."""
        self.dual_learning: bool = False
        """Learn α with the MPO dual loss (the reference keeps α fixed)."""
        self.dual_lr: float = 1e-2
        """Adam learning rate of log α when dual_learning."""
        self.squash_grad_q: str = "none"
        """none | cube_root: squashing of ∇_a Q in the policy loss."""
        self.action_penalty: float = 0.0
        """c >= 0: the policy follows ∇_a[Q(s, a) − c·‖a − clip(a, −1, 1)‖²] (0: the reference, no penalty).
        The unsquashed Gaussian's mean otherwise drifts outside the env's bounds (losses.out_of_bounds_grad)."""
        self.critic_clip_actions: bool = True
        """Clip the action fed to the critic into [−1, 1], as the reference code does (Acme's WPO critic,
        ``ClipToSpec``): Q outside the bounds equals Q at the bound the env clips to, so ∇_a Q is zero
        there and the unsquashed policy mean is not pushed by critic extrapolation. False: unclipped.
        With ``policy_bound="tanh_squash"`` every action is inside the bounds and the clip does nothing."""
        self.policy_bound: str = "none"
        """How the policy respects the action bounds [−1, 1] (docs/methods.md#wpo, "Action bounds"):

        - ``none`` (the reference, Acme's WPO): an unbounded Gaussian over a; the env clips its actions
          and the critic sees clip(a) (``critic_clip_actions``). ∇_a Q = 0 at every out-of-bounds sample,
          so a mean that drifts out gets less and less gradient and cannot come back (on DMC
          ``learner/policy_mean_abs`` rose from 1.2 to 4.8 in 100k steps).
        - ``tanh_mean``: the Gaussian over a with mean tanh(μ_raw) (Acme's TF ``MultivariateNormalDiagHead``
          option ``tanh_mean``, used by its SVG0-prior networks). The mean cannot leave [−1, 1]; samples
          still can (clipped as with ``none``, and those samples still carry no gradient).
        - ``tanh_squash``: a = tanh(u), u ~ N(μ, σ²); WPO's Gaussian update runs on u with
          ∇_u Q(s, tanh u) = (1 − a²) ⊙ ∇_a Q (``losses.tanh_squash_grad``), the Wasserstein flow in
          u-space. Every sample is inside the bounds and carries gradient, the critic is only queried
          where the env acts, the KL regulariser is the exact KL of the squashed policies, and the
          deterministic action is tanh(μ). The documented choice for DMC (experiments/wpo_dmc.yaml,
          as a commented alternative until benchmarked): it removes the dead zone instead of only
          bounding the mean, and is exact WPO for the squashed family.
        Both tanh options pass the gradient through tanh, which saturates: ``learner/policy_mean_saturated``
        reports the fraction of mean components with |μ_a| > 0.99."""
        self.policy_hidden: list[int] = [256, 256, 256]
        """Policy widths of the reference architecture (ignored when ``network`` is set)."""
        self.critic_hidden: list[int] = [256, 256, 256]
        """Critic widths of the reference architecture (ignored when ``network`` is set)."""

    def training(
        self,
        *,
        num_action_samples: int | None = NotProvided,
        num_target_action_samples: int | None = NotProvided,
        policy_lr: float | None = NotProvided,
        critic_lr: float | None = NotProvided,
        init_scale: float | None = NotProvided,
        epsilon_mean: float | None = NotProvided,
        epsilon_stddev: float | None = NotProvided,
        init_log_alpha_mean: float | None = NotProvided,
        init_log_alpha_stddev: float | None = NotProvided,
        dual_learning: bool | None = NotProvided,
        dual_lr: float | None = NotProvided,
        squash_grad_q: str | None = NotProvided,
        action_penalty: float | None = NotProvided,
        critic_clip_actions: bool | None = NotProvided,
        policy_bound: str | None = NotProvided,
        policy_hidden: list[int] | None = NotProvided,
        critic_hidden: list[int] | None = NotProvided,
        **kwargs: Any,
    ) -> WPOConfig:
        """WPO's settings (plus the off-policy core's and AlgorithmConfig.training's)."""
        given = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")}
        super().training(**kwargs)
        self._set_provided(given)
        return self

    def validate(self) -> None:
        super().validate()
        for key in ("num_action_samples", "num_target_action_samples"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 1, key, v, "an int >= 1")
        for key in ("init_scale", "epsilon_mean", "epsilon_stddev", "dual_lr"):
            v = getattr(self, key)
            _check(isinstance(v, int | float) and v > 0, key, v, "a number > 0")
        _check(isinstance(self.action_penalty, int | float) and self.action_penalty >= 0, "action_penalty",
               self.action_penalty, "a number >= 0")
        _check(isinstance(self.critic_clip_actions, bool), "critic_clip_actions", self.critic_clip_actions,
               "true, false")
        for key in ("policy_lr", "critic_lr"):
            v = getattr(self, key)
            _check(v is None or (isinstance(v, int | float) and v > 0), key, v, "None or a number > 0")
        _check(self.squash_grad_q in ("none", "cube_root"), "squash_grad_q", self.squash_grad_q,
               "none, cube_root")
        from algorithms.wpo.losses import POLICY_BOUNDS

        _check(self.policy_bound in POLICY_BOUNDS, "policy_bound", self.policy_bound, ", ".join(POLICY_BOUNDS))
        for key in ("policy_hidden", "critic_hidden"):
            v = getattr(self, key)
            _check(isinstance(v, list | tuple) and len(v) >= 1 and all(isinstance(w, int) and w >= 1 for w in v),
                   key, v, "a non-empty list of ints >= 1")
        import gymnasium as gym

        space = self.action_space
        if space is not None:
            _check(isinstance(space, gym.spaces.Box), "action_space", space, "a Box (WPO is for continuous actions)")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from algorithms.wpo.module import WPOModule

        return RLModuleSpec(module_class=WPOModule)

    def get_default_learner_class(self) -> type:
        from algorithms.wpo.learner import WPOLearner

        return WPOLearner

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {
            "init_scale": float(self.init_scale),
            "policy_bound": str(self.policy_bound),
            "policy_hidden": list(self.policy_hidden),
            "critic_hidden": list(self.critic_hidden),
            "init_log_alpha_mean": float(self.init_log_alpha_mean),
            "init_log_alpha_stddev": float(self.init_log_alpha_stddev),
        }
