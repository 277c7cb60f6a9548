"""OffPolicyConfig: the hyperparameters every algorithm on the fast off-policy core shares.

Subclasses (WPOConfig, EVEConfig) add their own and set ``algo_class``, the RLModule spec and the
learner class. All sizes are in env steps (one transition of one env) unless named otherwise.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided

from algorithms.networks.config import NetworkConfig


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{key}: got {value!r}; allowed: {allowed}")


class OffPolicyConfig(AlgorithmConfig):
    """Replay, samples-per-insert, targets and checkpointing of the off-policy core.

    One iteration (``Algorithm.train()``) runs ``training_step`` until at least
    ``min_sample_timesteps_per_iteration`` env steps were sampled; one ``training_step`` samples
    ``rollout_fragment_length`` vector steps on every env runner (``num_envs_per_env_runner`` envs
    each), inserts them into the learner's replay and runs the updates due (``updates_due``).
    """

    def __init__(self, algo_class: type | None = None):
        super().__init__(algo_class=algo_class)
        # Sampling: our vectorised env runner returns numpy arrays, not episode objects.
        from algorithms.offpolicy.env_runner import VectorEnvRunner

        self.env_runner_cls = VectorEnvRunner
        self.rollout_fragment_length = 64
        self.num_envs_per_env_runner = 1
        # env runner connector states are not used (no connectors on our runners)
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False
        self.min_sample_timesteps_per_iteration = 1000
        self.min_time_s_per_iteration = 0
        # Learning.
        self.train_batch_size_per_learner = 256
        self.lr = 3e-4
        self.gamma = 0.99
        self.grad_clip = 40.0
        self.grad_clip_by = "global_norm"
        self.samples_per_insert: float = 256.0
        """Samples per insert: updates × batch size / env steps inserted (after learning_starts)."""
        self.replay_capacity: int = 1_000_000
        """Transitions kept in the replay (a ring buffer)."""
        self.n_step: int = 1
        """n of the n-step returns computed on insert."""
        self.learning_starts: int = 1000
        """Env steps inserted before the first update."""
        self.max_updates_per_call: int = 64
        """At most this many updates per learner call (each call costs ~2 ms of overhead)."""
        self.target_update_period: int = 100
        """Update the target networks every this many learner updates."""
        self.target_update_tau: float = 1.0
        """θ_targ ← τ θ + (1 − τ) θ_targ at each target update; 1.0 is a hard copy."""
        self.checkpoint_replay: bool = False
        """Write the replay (and its sampler state) into checkpoints."""
        self.network: NetworkConfig | None = None
        """The spec's ``network`` block (algorithms.networks); algorithm defaults when None."""
        self.replay_device: str | None = None
        """Device of the replay storage; None: the learner's device."""
        self.replica_seeds: list[int] | None = None
        """Seed packing (algorithms.offpolicy.packing): the seeds of the K replicas this algorithm trains side by
        side, the first being ``seed``; None or one seed: no packing. The spec's ``pack_seeds`` sets it."""

    def _set_provided(self, values: dict[str, Any]) -> None:
        """Builder-method helper: set each attribute whose value was given (not ``NotProvided``)."""
        for key, value in values.items():
            if value is not NotProvided:
                setattr(self, key, value)

    def training(
        self,
        *,
        samples_per_insert: float | None = NotProvided,
        replay_capacity: int | None = NotProvided,
        n_step: int | None = NotProvided,
        learning_starts: int | None = NotProvided,
        max_updates_per_call: int | None = NotProvided,
        target_update_period: int | None = NotProvided,
        target_update_tau: float | None = NotProvided,
        checkpoint_replay: bool | None = NotProvided,
        network: NetworkConfig | dict | None = NotProvided,
        replay_device: str | None = NotProvided,
        **kwargs: Any,
    ) -> OffPolicyConfig:
        """Sets the off-policy core's settings (plus everything ``AlgorithmConfig.training`` takes)."""
        super().training(**kwargs)
        self._set_provided({
            "samples_per_insert": samples_per_insert, "replay_capacity": replay_capacity, "n_step": n_step,
            "learning_starts": learning_starts, "max_updates_per_call": max_updates_per_call,
            "target_update_period": target_update_period, "target_update_tau": target_update_tau,
            "checkpoint_replay": checkpoint_replay, "replay_device": replay_device,
        })
        if network is not NotProvided:
            self.network = NetworkConfig.model_validate(network) if isinstance(network, dict) else network
        return self

    def validate(self) -> None:
        super().validate()
        _check(float(self.samples_per_insert) > 0, "samples_per_insert", self.samples_per_insert, "a number > 0")
        for key in ("replay_capacity", "n_step", "max_updates_per_call", "target_update_period",
                    "train_batch_size_per_learner", "rollout_fragment_length", "num_envs_per_env_runner"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, key, value, "an int >= 1")
        _check(isinstance(self.learning_starts, int) and self.learning_starts >= 0, "learning_starts",
               self.learning_starts, "an int >= 0")
        _check(0.0 < float(self.target_update_tau) <= 1.0, "target_update_tau", self.target_update_tau,
               "a number in (0, 1]")
        _check(0.0 <= float(self.gamma) <= 1.0, "gamma", self.gamma, "a number in [0, 1]")
        _check(self.grad_clip is None or float(self.grad_clip) > 0, "grad_clip", self.grad_clip,
               "None or a number > 0")
        if isinstance(self.network, dict):  # config dict round trips (Tune, checkpoints) give a plain dict
            self.network = NetworkConfig.model_validate(self.network)
        _check(self.network is None or isinstance(self.network, NetworkConfig), "network", self.network,
               "a NetworkConfig or dict (the spec's network block) or None")
        _check(self.num_learners <= 1, "num_learners", self.num_learners,
               "0 (learner in the algorithm's process) or 1 (one remote learner, e.g. on a GPU)")
        _check(self.framework_str == "torch", "framework", self.framework_str, "torch")
        seeds = self.replica_seeds
        _check(seeds is None or (isinstance(seeds, list | tuple) and len(seeds) >= 1 and len(set(seeds)) == len(seeds)
                                 and all(isinstance(s, int) for s in seeds)),
               "replica_seeds", seeds, "None or a list of distinct int seeds")
        if seeds is not None and len(seeds) > 1:
            _check(self.num_env_runners == 0, "num_env_runners", self.num_env_runners,
                   "0 with pack_seeds > 1 (the replicas' env runners live in the trial's process)")
            _check(self.num_learners == 0, "num_learners", self.num_learners,
                   "0 with pack_seeds > 1 (the replicas' learners live in the trial's process)")

    @property
    def _model_config_auto_includes(self) -> dict[str, Any]:
        # the network block reaches the RLModule as model_config["network"] (a plain dict)
        block = self.network
        return {"network": block.model_dump() if isinstance(block, NetworkConfig) else block}

    @property
    def replay_config(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~algorithms.offpolicy.replay.TensorReplay` from this config."""
        return {"capacity": int(self.replay_capacity), "n_step": int(self.n_step), "gamma": float(self.gamma)}
