"""EVEConfig: epistemic Q-learning (Schmitt, Shawe-Taylor, van Hasselt, AAAI 2023, arXiv 2303.04012) on the
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
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from algorithms.offpolicy.config import OffPolicyConfig, _check

RESAMPLE_MODES = ("episode", "steps")
EXPLORATION_MODES = ("posterior", "epsilon_greedy", "greedy")
TARGET_ARGMAX_MODES = ("sample", "mean")
Q_HEADS = ("shared", "per_action")


class EVEConfig(OffPolicyConfig):
    """EVE hyperparameters; see the module docstring."""

    def __init__(self, algo_class: type | None = None):
        from algorithms.eve.algorithm import EVE
        from algorithms.eve.env_runner import EVEEnvRunner

        super().__init__(algo_class=algo_class or EVE)
        self.env_runner_cls = EVEEnvRunner
        self.lr = 1e-3
        self.train_batch_size_per_learner = 32
        self.samples_per_insert = 16.0
        self.gamma = 0.99
        self.n_step = 1
        self.grad_clip = None
        self.target_update_period = 50
        self.target_update_tau = 1.0
        self.replay_capacity = 100_000
        self.learning_starts = 100
        self.rollout_fragment_length = 1
        self.max_updates_per_call = 64
        self.min_sample_timesteps_per_iteration = 1000
        self.hidden: list[int] = [64]
        """Q network widths (ignored when the spec's ``network`` block is set)."""
        self.activation: str = "elu"
        """Hidden activation of the Q network (ignored when the spec's ``network`` block is set). ELU, not
        ReLU: on deep_sea's one-hot inputs ReLU units die, and a dead unit passes no posterior noise, so
        the epistemic spread collapses; ELU's derivative below zero is exp(x) > 0 (measurements:
        benchmarks/README.md, eve_deep_sea.py)."""
        self.norm: str = "layer"
        """Normalisation before each hidden activation of the Q network: none | layer | rms (ignored when
        the spec's ``network`` block is set; with a norm the hidden layers drop their bias). LayerNorm keeps
        ~47% of the units active at unvisited deep_sea cells; without it the shared first-layer bias, trained
        by every visited cell, pushed the unvisited cells' ELU units negative and their noise away."""
        self.double_q: bool = True
        """Double Q-learning targets (argmax by the online network, value by the target)."""
        self.noise_var: float = 0.001
        """σ²: variance of the return density N(G; Q_θ(s, a), σ²)."""
        self.prior_precision: float = 0.1
        """λ: damping of the posterior precision N·diag F + λ (a Gaussian prior's precision); it only matters
        for parameters the data has not pinned down (e.g. the input weights of unvisited states)."""
        self.fisher_decay: float = 0.999
        """β of the running (EMA, bias-corrected) diagonal Fisher estimate."""
        self.exploration: str = "posterior"
        """posterior (EVE: greedy on a posterior sample θ̃) | epsilon_greedy (the baseline: ε-greedy on θ̂) |
        greedy (on θ̂). The learner tracks the Fisher only for posterior."""
        self.posterior_scale: float = 1.0
        """Multiplies the posterior std of the samples (1 = the posterior; 0 = greedy on θ̂)."""
        self.resample: str = "episode"
        """episode (a new θ̃ when an env's episode starts) | steps (every resample_every env steps)."""
        self.perturbation: str = "linearised"
        """linearised (act on Q_θ̂ + ∇_θQᵀ(θ̃ − θ̂), the Delta-Variance Gaussian) | parameters (on Q_θ̃ itself)."""
        self.resample_every: int = 1
        """k for resample='steps'."""
        self.epsilon_initial: float = 1.0
        self.epsilon_final: float = 0.05
        self.epsilon_timesteps: int = 1000
        """ε anneals linearly from epsilon_initial to epsilon_final over this many env steps (per runner)."""
        self.target_sampling: bool = True
        """With exploration='posterior': bootstrap from a linearised posterior sample of the target network,
        drawn per update (uncertainty-carrying targets; see algorithms.eve.learner)."""
        self.target_argmax: str = "sample"
        """With target_sampling and double_q: which values pick the bootstrap action. sample: the posterior
        sample's (Q_θ̂ + J δ of the online net, with the target's draw δ); mean: Q_θ̂ (zero-mean target noise)."""
        self.target_noise_clip: float | None = 1.0
        """With target_sampling: clip each sampled value's perturbation J δ to [-c, c] in the targets (None: no
        clip). Bounds the optimism a barely visited next state adds to a target (E[max] of the noisy values),
        so inflated values wash out once the states are visited; set it on the scale of the rewards (bsuite's
        are within [-1, 1]). Default 1: without it per-action heads inflated deep_sea's values far above their
        true range (benchmarks/README.md, eve_deep_sea.py)."""
        self.q_heads: str = "per_action"
        """shared (one MLP with A outputs) | per_action (A separate MLPs with one output each: the posterior
        noise of different actions' values is independent, so the gap between them keeps the spread of
        each; with a shared torso the perturbations of a hidden unit move every action's value alike)."""
        self.uncertainty_batch_size: int = 64
        """Replay states on which the epistemic std of Q (a Delta Variance) is reported each iteration."""

    def training(
        self,
        *,
        hidden: list[int] | None = NotProvided,
        activation: str | None = NotProvided,
        norm: str | None = NotProvided,
        double_q: bool | None = NotProvided,
        noise_var: float | None = NotProvided,
        prior_precision: float | None = NotProvided,
        fisher_decay: float | None = NotProvided,
        exploration: str | None = NotProvided,
        posterior_scale: float | None = NotProvided,
        resample: str | None = NotProvided,
        resample_every: int | None = NotProvided,
        perturbation: str | None = NotProvided,
        epsilon_initial: float | None = NotProvided,
        epsilon_final: float | None = NotProvided,
        epsilon_timesteps: int | None = NotProvided,
        target_sampling: bool | None = NotProvided,
        target_argmax: str | None = NotProvided,
        target_noise_clip: float | None = NotProvided,
        q_heads: str | None = NotProvided,
        uncertainty_batch_size: int | None = NotProvided,
        **kwargs: Any,
    ) -> EVEConfig:
        """EVE's settings (plus the off-policy core's and AlgorithmConfig.training's)."""
        given = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")}
        super().training(**kwargs)
        self._set_provided(given)
        return self

    def validate(self) -> None:
        super().validate()
        for key in ("noise_var", "prior_precision"):
            v = getattr(self, key)
            _check(isinstance(v, int | float) and v > 0, key, v, "a number > 0")
        _check(isinstance(self.posterior_scale, int | float) and self.posterior_scale >= 0, "posterior_scale",
               self.posterior_scale, "a number >= 0")
        _check(0.0 <= float(self.fisher_decay) < 1.0, "fisher_decay", self.fisher_decay, "a number in [0, 1)")
        _check(self.perturbation in ("linearised", "parameters"), "perturbation", self.perturbation,
               "linearised, parameters")
        _check(self.target_argmax in TARGET_ARGMAX_MODES, "target_argmax", self.target_argmax,
               ", ".join(TARGET_ARGMAX_MODES))
        _check(self.target_noise_clip is None or (isinstance(self.target_noise_clip, int | float)
               and not isinstance(self.target_noise_clip, bool) and self.target_noise_clip > 0),
               "target_noise_clip", self.target_noise_clip, "None or a number > 0")
        _check(self.q_heads in Q_HEADS, "q_heads", self.q_heads, ", ".join(Q_HEADS))
        _check(self.resample in RESAMPLE_MODES, "resample", self.resample, ", ".join(RESAMPLE_MODES))
        for key in ("resample_every", "uncertainty_batch_size"):
            v = getattr(self, key)
            _check(isinstance(v, int) and v >= 1, key, v, "an int >= 1")
        _check(isinstance(self.epsilon_timesteps, int) and self.epsilon_timesteps >= 0, "epsilon_timesteps",
               self.epsilon_timesteps, "an int >= 0")
        for key in ("epsilon_initial", "epsilon_final"):
            v = getattr(self, key)
            _check(isinstance(v, int | float) and 0.0 <= v <= 1.0, key, v, "a number in [0, 1]")
        _check(self.exploration in EXPLORATION_MODES, "exploration", self.exploration, ", ".join(EXPLORATION_MODES))
        _check(isinstance(self.hidden, list | tuple) and all(isinstance(w, int) and w >= 1 for w in self.hidden),
               "hidden", self.hidden, "a list of ints >= 1")
        from typing import get_args

        from algorithms.networks.config import Activation, Norm

        _check(self.activation in get_args(Activation), "activation", self.activation, ", ".join(get_args(Activation)))
        _check(self.norm in get_args(Norm), "norm", self.norm, ", ".join(get_args(Norm)))
        import gymnasium as gym

        if self.action_space is not None:
            _check(isinstance(self.action_space, gym.spaces.Discrete), "action_space", self.action_space,
                   "a Discrete space (EVE's Q-learning is for discrete actions)")

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from algorithms.eve.module import EVEModule

        return RLModuleSpec(module_class=EVEModule)

    def get_default_learner_class(self) -> type:
        from algorithms.eve.learner import EVELearner

        return EVELearner

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"hidden": list(self.hidden), "activation": self.activation,
                                                     "norm": self.norm,
                                                     "q_heads": self.q_heads}
