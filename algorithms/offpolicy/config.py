"""OffPolicyConfig: the hyperparameters every algorithm on the fast off-policy core shares.

:class:`OffPolicySettings` is the one place each setting is declared: its default, its bounds or allowed
values and a one-line docstring (``orchestra validate --settings WPO`` lists them). Subclasses
(WPOSettings, EVESettings) add their own fields and re-declare a core field only to change its default
(the ``Annotated`` types below carry its bounds and doc). :class:`OffPolicyConfig` takes its defaults from
its ``SETTINGS`` model, ``training(**kw)`` accepts the model's fields, and ``validate()`` checks the
current values through the model (:func:`algorithms.settings.check_settings`). Subclasses (WPOConfig,
EVEConfig) set ``SETTINGS``, ``algo_class``, the RLModule spec and the learner class. All sizes are in env
steps (one transition of one env) unless named otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided

from algorithms.networks.config import NetworkConfig
from algorithms.settings import SettingError, check_settings


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    """A rule between settings (the model checks each setting on its own)."""
    if not cond:
        raise SettingError(key, value, allowed)


# Settings whose default an algorithm changes: the type carries the bounds and the doc, each field its default.
Width = Annotated[int, Field(ge=1, strict=True)]
SamplesPerInsert = Annotated[float, Field(gt=0, description=(
    "Samples per insert: updates × batch size / env steps inserted (after learning_starts)."))]
ReplayCapacity = Annotated[int, Field(ge=1, description="Transitions kept in the replay (a ring buffer).")]
NStep = Annotated[int, Field(ge=1, description="n of the n-step returns computed on insert.")]
LearningStarts = Annotated[int, Field(ge=0, description="Env steps inserted before the first update.")]
TargetUpdatePeriod = Annotated[int, Field(ge=1, description="Update the target networks every this many learner updates.")]
BatchSize = Annotated[int, Field(ge=1, description="B: transitions per update (RLlib's train_batch_size_per_learner).")]
LearningRate = Annotated[Annotated[float, Field(gt=0)] | list[list[float]], Field(
    description="Adam learning rate (RLlib's lr; a list [[env step, lr], ...] is RLlib's schedule).",
    json_schema_extra={"allowed": "a number > 0, or a schedule [[env step, lr], ...]"})]
GradClip = Annotated[float | None, Field(gt=0, description="Clip each optimiser's gradients to this norm (None: no clipping).")]
RolloutFragment = Annotated[int, Field(ge=1, description=(
    "Vector steps each env runner samples per chunk (one insert and the updates due follow each chunk)."))]


class OffPolicySettings(BaseModel):
    """Replay, samples-per-insert, targets and checkpointing of the off-policy core, plus the RLlib
    settings it gives its own defaults (batch size, lr, γ, clipping, sampling chunk, iteration size)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
    MODULE_KEYS: ClassVar[tuple[str, ...]] = ()
    """Settings the RLModule reads from its model_config (the config's auto-includes; the network block too)."""

    # RLlib's settings (AlgorithmConfig attributes) with the core's defaults.
    rollout_fragment_length: RolloutFragment = 64
    num_envs_per_env_runner: int = Field(1, ge=1)
    """E: gymnasium envs each env runner steps side by side."""
    min_sample_timesteps_per_iteration: int = Field(1000, ge=0)
    """Env steps sampled per iteration (one Algorithm.train())."""
    min_time_s_per_iteration: float | None = Field(0, ge=0)
    """Minimum seconds per iteration; 0 so an iteration's size never depends on wall time."""
    train_batch_size_per_learner: BatchSize = 256
    lr: LearningRate = 3e-4
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount γ."""
    grad_clip: GradClip = 40.0
    grad_clip_by: Literal["value", "norm", "global_norm"] = "global_norm"
    """How grad_clip applies (RLlib's modes: each value, each tensor's norm, the global norm)."""
    num_learners: int = Field(0, ge=0, le=1)
    """0: the learner runs in the algorithm's process; 1: one remote learner (e.g. on a GPU)."""
    # The core's own settings.
    samples_per_insert: SamplesPerInsert = 256.0
    replay_capacity: ReplayCapacity = 1_000_000
    n_step: NStep = 1
    learning_starts: LearningStarts = 1000
    max_updates_per_call: int = Field(64, ge=1)
    """At most this many updates per learner call (each call costs ~2 ms of overhead)."""
    target_update_period: TargetUpdatePeriod = 100
    target_update_tau: float = Field(1.0, gt=0, le=1)
    """τ: θ_targ ← τ θ + (1 − τ) θ_targ at each target update; 1.0 is a hard copy."""
    checkpoint_replay: bool = False
    """Write the replay (and its sampler state) into checkpoints."""
    network: NetworkConfig | None = None
    """The spec's ``network`` block (algorithms.networks); None: the algorithm's own architecture."""
    replay_device: str | None = None
    """Device of the replay storage (e.g. cpu, cuda); None: the learner's device."""
    replica_seeds: Annotated[list[Annotated[int, Field(strict=True)]], Field(min_length=1, strict=False)] | None = Field(
        None, json_schema_extra={"allowed": "None or a list of distinct int seeds"})
    """Seeds of the K replicas trained side by side (the first is ``seed``); set from the spec's pack_seeds."""
    # Seed packing: algorithms.offpolicy.packing; None or one seed: no packing.

    @classmethod
    def module_config(cls, model_config: dict[str, Any] | None) -> dict[str, Any]:
        """An RLModule's ``model_config`` with each ``MODULE_KEYS`` setting it lacks at this model's default
        (the modules' fallbacks, so a module built without the config's auto-includes matches the config)."""
        defaults = cls()
        return {key: getattr(defaults, key) for key in cls.MODULE_KEYS} | dict(model_config or {})

    @field_validator("replica_seeds")
    @classmethod
    def _distinct(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError("replica seeds must be distinct")
        return seeds


class OffPolicyConfig(AlgorithmConfig):
    """Replay, samples-per-insert, targets and checkpointing of the off-policy core.

    One iteration (``Algorithm.train()``) runs ``training_step`` until at least
    ``min_sample_timesteps_per_iteration`` env steps were sampled; one ``training_step`` samples
    ``rollout_fragment_length`` vector steps on every env runner (``num_envs_per_env_runner`` envs
    each), inserts them into the learner's replay and runs the updates due (``updates_due``).
    Every setting and its default: ``SETTINGS`` (:class:`OffPolicySettings` or a subclass).
    """

    SETTINGS: ClassVar[type[OffPolicySettings]] = OffPolicySettings

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class)
        # Sampling: our vectorised env runner returns numpy arrays, not episode objects.
        from algorithms.offpolicy.env_runner import VectorEnvRunner

        self.env_runner_cls = VectorEnvRunner
        # env runner connector states are not used (no connectors on our runners)
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False
        defaults = self.SETTINGS()
        for key in self.SETTINGS.model_fields:
            setattr(self, key, getattr(defaults, key))

    def _set_provided(self, values: dict[str, Any]) -> None:
        """Builder-method helper: set each attribute whose value was given (not ``NotProvided``)."""
        for key, value in values.items():
            if value is not NotProvided:
                setattr(self, key, value)

    def training(self, **kwargs: Any) -> Self:
        """Sets the fields of ``SETTINGS`` given as keywords (``orchestra validate --settings NAME`` lists
        them); every other keyword goes to ``AlgorithmConfig.training``."""
        own = {key: kwargs.pop(key) for key in list(kwargs) if key in self.SETTINGS.model_fields}
        super().training(**kwargs)
        self._set_provided(own)
        if isinstance(self.network, dict):
            self.network = NetworkConfig.model_validate(self.network)
        return self

    def settings(self) -> OffPolicySettings:
        """The current values of every setting, validated by ``SETTINGS`` (:class:`SettingError` if one is bad)."""
        if isinstance(self.network, dict):  # config dict round trips (Tune, checkpoints) give a plain dict
            self.network = NetworkConfig.model_validate(self.network)
        return check_settings(self.SETTINGS, {key: getattr(self, key) for key in self.SETTINGS.model_fields})

    def validate(self) -> None:
        super().validate()
        self.settings()
        _check(self.framework_str == "torch", "framework", self.framework_str, "torch")
        seeds = self.replica_seeds
        if seeds is not None and len(seeds) > 1:
            _check(self.num_env_runners == 0, "num_env_runners", self.num_env_runners,
                   "0 with pack_seeds > 1 (the replicas' env runners live in the trial's process)")
            _check(self.num_learners == 0, "num_learners", self.num_learners,
                   "0 with pack_seeds > 1 (the replicas' learners live in the trial's process)")
            block = self.network
            for key in ("redo", "shrink_perturb", "reset"):
                value = getattr(block, key, None) if isinstance(block, NetworkConfig) else None
                _check(value is None, f"network.{key}", value,
                       "unset with pack_seeds > 1 (it edits optimiser state, which packing stacks)")

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        # the network block reaches the RLModule as model_config["network"] (a plain dict), with MODULE_KEYS
        block = self.network
        return {"network": block.model_dump() if isinstance(block, NetworkConfig) else block} | {
            key: getattr(self, key) for key in self.SETTINGS.MODULE_KEYS}

    @property
    def replay_config(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~algorithms.offpolicy.replay.TensorReplay` from this config."""
        return {"capacity": int(self.replay_capacity), "n_step": int(self.n_step), "gamma": float(self.gamma)}
