"""OffPolicyAlgorithm: RLlib Algorithm whose training_step samples vectorised env steps, inserts them
into the learner's replay and runs updates at the configured samples-per-insert ratio.

One ``training_step`` is one iteration (it runs until ``min_sample_timesteps_per_iteration`` env steps
were sampled, so iteration sizes do not depend on wall time). Per chunk:

1. sample ``rollout_fragment_length`` vector steps on every sampling env runner (the local one, or
   all remote ones in parallel) as numpy arrays [T, E, ...];
2. one learner call (``LearnerGroup.foreach_learner``): ``insert`` the chunk, then ``run_updates`` with
   the number due, ``updates_due(S, B, spi, U, learning_starts)`` (at most ``max_updates_per_call`` per
   call; more calls if more are due);
3. sync the new weights to the env runners (``EnvRunnerGroup.sync_weights``, inference-only state; with a
   local learner and no remote runners the tensors are copied directly, :meth:`OffPolicyAlgorithm._sync_weights`).

Results: ``learners/<module>/...`` (losses and statistics, means over the iteration's updates),
``env_runners/...`` (episode_return_mean, num_env_steps_sampled_lifetime, ...),
``system/{env_steps_per_s, updates_per_s}`` for this iteration, and top-level
``num_env_steps_sampled_lifetime``.

Checkpoints: RLlib's (learner state with modules, optimisers, network-update state; the local env
runner), plus this algorithm's counters and the remote env runners' sampler states (so sampling
continues exactly); the replay when ``config.checkpoint_replay``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)

from algorithms.offpolicy.ratio import updates_due

CORE_STATE = "offpolicy_core"
SYSTEM = "system"


def _concat_envs(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Runner chunks [T, E_r, ...] -> one chunk [T, sum E_r, ...] (runner order = env slot order)."""
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}


def _tensor_pairs(src: torch.nn.Module, dst: torch.nn.Module) -> list[tuple[tuple[Any, str], tuple[Any, str]]] | None:
    """[((dst owner, name), (src owner, name))] for every parameter and buffer in ``dst``'s state dict, matched by
    qualified name in ``src``'s; None when ``dst`` has one that ``src`` lacks."""
    def owners(module: torch.nn.Module) -> dict[str, tuple[Any, str]]:
        found = {}
        for prefix, sub in module.named_modules():
            for name, _ in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                found[f"{prefix}.{name}" if prefix else name] = (sub, name)
        return found

    keys = set(dst.state_dict())
    d, s = owners(dst), owners(src)
    if not keys <= set(s) or not keys <= set(d):
        return None
    return [(d[k], s[k]) for k in sorted(keys)]


class OffPolicyAlgorithm(Algorithm):
    """Base Algorithm of the off-policy core; subclasses give ``get_default_config``."""

    supports_pack_seeds = True
    """Trains ``config.replica_seeds`` as K replicas in one trial (:mod:`algorithms.offpolicy.packing`)."""

    def setup(self, config: Any) -> None:
        super().setup(config)
        self.env_steps_inserted = 0
        self.updates_done = 0
        # Our runners keep no connector states, so RLlib's setup did not broadcast the weights.
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
        self._pack = None
        if len(self.config.replica_seeds or ()) > 1:
            from algorithms.offpolicy.packing import ReplicaPack

            self._pack = ReplicaPack.build(self)
            self._pack.sync_weights()
        self._replica_results: dict[str, Any] = {}

    def _sync_weights(self) -> None:
        """Learner -> env runners. A local learner with the local runner only: copy each parameter and buffer of
        the runner's module from the learner's module in place (RLlib's sync goes through numpy state dicts: 3.5
        ms per call for EVE's [64] network here, every rollout fragment), then the runner's ``on_weights_set``.
        The (owner, name) pairs are found once per pair of module objects and read live at each sync."""
        learner = getattr(self.learner_group, "_learner", None)
        runner = self.env_runner
        if not self._remote and learner is not None and runner is not None and hasattr(runner, "on_weights_set"):
            src, dst = learner.module[DEFAULT_MODULE_ID].unwrapped(), runner.module
            cached = getattr(self, "_sync_plan", None)
            if cached is None or cached[0] is not src or cached[1] is not dst:
                cached = self._sync_plan = (src, dst, _tensor_pairs(src, dst))
            if cached[2] is not None:
                with torch.no_grad():
                    for (d_owner, d_name), (s_owner, s_name) in cached[2]:
                        getattr(d_owner, d_name).copy_(getattr(s_owner, s_name))
                runner.on_weights_set()
                return
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)

    @property
    def _remote(self) -> bool:
        return self.env_runner_group.num_remote_env_runners() > 0

    def _sample(self) -> tuple[dict[str, np.ndarray], list[dict]]:
        if self._remote:
            results = self.env_runner_group.foreach_env_runner(
                lambda r: r.sample_and_metrics(), local_env_runner=False)
            return _concat_envs([r[0] for r in results]), [r[1] for r in results]
        return self.env_runner.sample(), []

    def _learner_call(self, data: dict[str, np.ndarray] | None, num_updates: int) -> None:
        timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.env_steps_inserted}

        def call(learner, data=data, k=num_updates, ts=timesteps):
            if data is not None:
                learner.insert(data)
            return learner.run_updates(k, ts)

        results = self.learner_group.foreach_learner(call)
        for r in results:
            if not r.ok:
                raise r.get()
        self.updates_done += num_updates

    def training_step(self) -> None:
        if self._pack is not None:
            self._packed_training_step()
            return
        cfg = self.config
        t0 = time.perf_counter()
        sampled, updates_before, runner_metrics = 0, self.updates_done, []
        target = max(1, int(cfg.min_sample_timesteps_per_iteration))
        batch = int(cfg.train_batch_size_per_learner)
        while sampled < target:
            data, metrics = self._sample()
            runner_metrics += metrics
            n = int(data["reward"].size)
            sampled += n
            self.env_steps_inserted += n
            due = updates_due(self.env_steps_inserted, batch, float(cfg.samples_per_insert), self.updates_done,
                              int(cfg.learning_starts))
            first = min(due, int(cfg.max_updates_per_call))
            self._learner_call(data, first)
            due -= first
            while due > 0:
                k = min(due, int(cfg.max_updates_per_call))
                self._learner_call(None, k)
                due -= k
            self._sync_weights()
        updates = self.updates_done - updates_before
        if not self._remote:
            runner_metrics = [self.env_runner.get_metrics()]
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        learner_results = [r.get() for r in self.learner_group.foreach_learner(lambda learner: learner.reduce_stats())]
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)
        dt = max(time.perf_counter() - t0, 1e-9)
        self.metrics.log_value((SYSTEM, "env_steps_per_s"), sampled / dt, window=1)
        self.metrics.log_value((SYSTEM, "updates_per_s"), updates / dt, window=1)
        self.metrics.log_value((SYSTEM, "samples_per_insert"),
                               self.updates_done * batch / max(1, self.env_steps_inserted - cfg.learning_starts),
                               window=1)
        self.metrics.log_value((SYSTEM, "num_updates_lifetime"), self.updates_done, window=1)

    def _packed_training_step(self) -> None:
        """The loop above for the K replicas of a pack (algorithms.offpolicy.packing): each samples, inserts and
        updates at the same ratio (the counters are those of one replica), then syncs its own weights. Results:
        per replica under ``replicas``, pooled over the live replicas at the top level."""
        from algorithms.offpolicy.packing import REPLICAS_KEY

        pack, cfg = self._pack, self.config
        if not pack.live:
            raise RuntimeError("every replica of this pack stopped: " + "; ".join(
                f"seed {r.seed}: {r.failed}" for r in pack.replicas))
        t0 = time.perf_counter()
        sampled, updates_before = 0, self.updates_done
        target = max(1, int(cfg.min_sample_timesteps_per_iteration))
        batch = int(cfg.train_batch_size_per_learner)
        while sampled < target and pack.live:
            n = pack.sample()
            sampled += n
            self.env_steps_inserted += n
            due = updates_due(self.env_steps_inserted, batch, float(cfg.samples_per_insert), self.updates_done,
                              int(cfg.learning_starts))
            while due > 0:
                k = min(due, int(cfg.max_updates_per_call))
                pack.run_updates(k, {NUM_ENV_STEPS_SAMPLED_LIFETIME: self.env_steps_inserted})
                self.updates_done += k
                due -= k
            pack.sync_weights()
        dt = max(time.perf_counter() - t0, 1e-9)
        replicas, runner_metrics, learner_metrics = pack.iteration_results(sampled, dt)
        self._replica_results = {REPLICAS_KEY: replicas}
        if runner_metrics:
            self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        if learner_metrics:
            self.metrics.aggregate(learner_metrics, key=LEARNER_RESULTS)
        live = max(1, len(runner_metrics))
        self.metrics.log_value((SYSTEM, "env_steps_per_s"), sampled * live / dt, window=1)
        self.metrics.log_value((SYSTEM, "updates_per_s"), (self.updates_done - updates_before) * live / dt, window=1)
        self.metrics.log_value((SYSTEM, "num_updates_lifetime"), self.updates_done, window=1)
        self.metrics.log_value((SYSTEM, "num_replicas_live"), len(pack.live), window=1)

    def _compile_iteration_results(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        results = super()._compile_iteration_results(*args, **kwargs)
        if self._pack is not None:
            results.update(self._replica_results)
            # the steps of one replica (every live one samples as many), so `stop: {steps: N}` means N per seed
            results[NUM_ENV_STEPS_SAMPLED_LIFETIME] = int(self.env_steps_inserted)
        results.setdefault(NUM_ENV_STEPS_SAMPLED_LIFETIME, int(
            (results.get(ENV_RUNNER_RESULTS) or {}).get(NUM_ENV_STEPS_SAMPLED_LIFETIME, self.env_steps_inserted)))
        return results

    # -- state -------------------------------------------------------------------------------------
    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if self._check_component(CORE_STATE, components, not_components):
            core = {"env_steps_inserted": self.env_steps_inserted, "updates_done": self.updates_done}
            if self._remote:
                core["remote_env_runners"] = self.env_runner_group.foreach_env_runner(
                    lambda r: r.get_state(not_components=[COMPONENT_RL_MODULE]), local_env_runner=False)
            if self._pack is not None:
                from algorithms.offpolicy.packing import PACK_STATE

                core[PACK_STATE] = self._pack.get_state()
            state[CORE_STATE] = core
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        core = state.get(CORE_STATE)
        if core is None:
            return
        self.env_steps_inserted = int(core["env_steps_inserted"])
        self.updates_done = int(core["updates_done"])
        if self._pack is not None:
            from algorithms.offpolicy.packing import PACK_STATE

            self._pack.set_state(core[PACK_STATE])
            self._pack.sync_weights()
        remote_states = core.get("remote_env_runners") or []
        if remote_states and self._remote:
            ids = self.env_runner_group.healthy_worker_ids()
            if len(ids) != len(remote_states):
                raise ValueError(f"checkpoint has {len(remote_states)} env runner states; this algorithm has "
                                 f"{len(ids)} remote env runners (num_env_runners must match to restore)")
            for wid, s in zip(sorted(ids), remote_states):
                self.env_runner_group.foreach_env_runner(
                    lambda r, s=s: r.set_state(s), local_env_runner=False, remote_worker_ids=[wid])
