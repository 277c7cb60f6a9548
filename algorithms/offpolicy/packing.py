"""Seed packing: K seeds of one configuration trained as K independent replicas inside one trial.

Why: studies run 3-10 seeds per configuration of small networks, where a trial's cost is mostly fixed
overhead (a Tune trial and its RLlib actors, a process, per-update Python and optimiser dispatch), not
arithmetic. Packing K seeds into one trial pays that overhead once per pack; the spec's ``pack_seeds: K``
turns on (orchestration groups the seeds K per trial and sets ``OffPolicyConfig.replica_seeds``).

Design (shape letter K: replicas; replica k trains seed s_k):

- A replica is exactly what an unpacked trial of seed s_k holds: its env runner (envs, episode seeds and
  the exploration generator derived from s_k; EVE's per-env posterior samples), its learner (module built
  under s_k's RNG, target networks, loss generator, replay with its own sampling generator, EVE's running
  Fisher, the network block's NaP / weight-decay state) and its metrics. Replica 0 uses the Algorithm's
  own local env runner and learner; replicas 1..K-1 are built in the trial's process from copies of the
  config with their seed (:func:`algorithms.offpolicy.inprocess.build_runner_and_learner`). The replay
  is one :class:`~algorithms.offpolicy.replay.TensorReplay` per replica, not one buffer with a replica
  axis: each keeps its own sampling indices and generator, which is what keeps replica k's batches those
  of seed s_k unpacked.
- Parameters are stacked: for every tensor a learner's optimiser updates, one leaf tensor θ [K, ...] holds
  the K replicas' values and each replica's parameter is the view θ[k] (``param.data = θ[k]``), so the
  replicas' modules, target copies, weight syncs and checkpoints work unchanged. :class:`StackedOptimizer`
  runs one optimiser (the replicas' own class and hyperparameters, e.g. the fused Adam) over the stacked
  tensors. Adam is elementwise, so one Adam over θ [K, ...] is K independent Adams: per element
  m ← β₁m + (1 − β₁)g, v ← β₂v + (1 − β₂)g², θ ← θ − lr·m̂/(√v̂ + ε) with the same step count t for all K.
- What is not elementwise is done per replica: global-norm gradient clipping uses each replica's own norm,
  ‖g_k‖ = sqrt(Σ_tensors ‖g[k]‖²), and scales g[k] by min(1, c / (‖g_k‖ + 1e-6)) (the unpacked learner's
  :func:`algorithms.offpolicy.learner._clip_`); decoupled weight decay θ_k ← θ_k − lr·λ·(θ_k − θ_ref,k)
  and NaP's projection W_k ← ‖W_0,k‖·W_k/‖W_k‖ run per replica on the views (each replica's network
  chain, with its own initial norms and references); target networks update per replica.
- One update of the pack: for each live replica, sample its batch (its own replay generator), then its
  loss and gradients, then one stacked clipping and optimiser step for all. Losses and gradients run
  either vectorised or replica by replica:

  - vectorised (:meth:`ReplicaPack._vectorised_updates`, when every learner's
    ``supports_vectorised_losses()``: the core's Q-learner, EVE with exploration="epsilon_greedy"): the
    batches are stacked [K, B, ...] and ``torch.func.vmap`` of the learner's ``functional_loss`` (the
    networks run by ``torch.func.functional_call``) over the stacked parameters θ [K, ...] and target
    tensors gives the K losses L_k [K] in one call; one backward pass of Σ_k L_k fills θ.grad, and since
    L_k depends on θ[k] only, ∂(Σ_j L_j)/∂θ[k] = ∂L_k/∂θ[k] is replica k's own gradient. Target
    networks' parameters are views of stacked tensors as well (``p_k.data = T[k]``).
  - replica by replica (every other learner: WPO's losses, EVE's hand-written Fisher and loss gradient):
    the algorithm's own ``compute_losses`` / ``compute_gradients``, K forward/backward passes of the small
    networks.

  What is shared either way is the trial, the process, the loop and the optimiser step.
- Sampling (:meth:`ReplicaPack.sample`): each replica's envs step on their own (env steps stay replica by
  replica), and the action pass runs either once for all replicas or replica by replica:

  - packed (:meth:`ReplicaPack._packed_sample`, when every runner's ``supports_packed_actions()``: the
    core's Q-learner and EVE's greedy mode, which act on Q_θ̂ alone): per vector step one
    ``torch.func.vmap`` of the runners' action network over its stacked parameters A [K, ...] (the
    runners' parameters are views A[k], written in place by the weight syncs) gives every replica's
    Q_θ̂(s) [K, E, A]; then each replica's own exploration draws (burn-in uniform actions, ε-greedy) from its
    own generator, as its ``compute_actions`` would, its envs' step and, at the end, its replay insert.
  - replica by replica (every other runner: EVE's posterior sampling acts on per-env θ̃_e): each runner's
    ``sample``.

  Either way replica k's actions, transitions and replay equal those of seed s_k sampled unpacked.
- Per-replica results: each replica keeps a root MetricsLogger of its own env runner and learner
  statistics (and EVE's ``uncertainty/``); the Algorithm's result carries them under ``replicas``
  ({seed: result in the Algorithm's own layout}) and its top level pools the live replicas (as RLlib pools
  several env runners). orchestration's tracking callback logs each replica as its own child run.
- Failure: a replica whose iteration loss is non-finite (or whose gradient norm is, during an update)
  stops: it is no longer sampled nor updated, its result says ``failed`` once, the other replicas go on.
  (Unpacked, a non-finite gradient skips one update with a warning; packed, it stops that replica, since
  the stacked step cannot skip one replica's slice.) The trial fails when every replica has.
- Checkpoints: the Algorithm's state (replica 0, as unpacked) plus :meth:`ReplicaPack.get_state`: every
  other replica's learner and sampler state, the stacked optimisers' state, each replica's metrics and
  the failed set.

Limits: env runners and learner in the trial's process (``num_env_runners`` and ``num_learners`` 0), no
plasticity interventions that edit optimiser state (ReDo, Shrink & Perturb, resets). With
``checkpoint_replay`` every replica's replay is in the checkpoint (part of its learner state). Diagnostics
callbacks (plasticity, credit, bsuite) see replica 0's learner and env runner only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, LEARNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger
from torch import Tensor

from algorithms.offpolicy.module import update_target_networks

REPLICAS_KEY = "replicas"
FAILED_KEY = "failed"
PACK_STATE = "replica_pack"


def replica_norms(grads: list[Tensor]) -> Tensor:
    """‖g_k‖ [K] = sqrt(Σ_j ‖g_j[k]‖²) over stacked gradients g_j [K, ...] (each replica's global norm)."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads])
    return torch.linalg.vector_norm(per_tensor, dim=0)


def clip_per_replica_(grads: list[Tensor], max_norm: float | None) -> Tensor:
    """In place: g_j[k] ← g_j[k] · min(1, c / (‖g_k‖ + 1e-6)) for each replica k (``replica_norms``); returns
    ‖g_k‖ [K] before clipping (no clipping when ``max_norm`` is None)."""
    norms = replica_norms(grads)
    if max_norm is None:
        return norms
    scale = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.reshape((-1,) + (1,) * (g.dim() - 1)))
    return norms


def stacked_forward(net: torch.nn.Module) -> Callable[[list[Tensor], Tensor], Tensor]:
    """``run(A, x)`` = stack_k net(x[k]; θ = A_k): ``net`` evaluated with the k-th rows of its stacked parameters
    A = [A_j [K, ...] for each of ``net.parameters()``, in that order] on x [K, ...], as one ``torch.func.vmap``
    call. Inside the vmapped function each parameter slot of ``net`` holds its batched row for the call and gets
    its own Parameter back afterwards (what ``torch.func.functional_call`` does, without its per-call walk over
    the module tree, which costs more than the network's small layers). Bit for bit the per-replica outputs
    for the Q-learner's networks (tests/test_packing.py); it is not a guarantee of vmap's batching rules in
    general."""
    slots = [(m, name) for m in net.modules() for name, _ in m.named_parameters(recurse=False)]
    if len(slots) != len(list(net.parameters())):
        raise ValueError("stacked_forward: the network shares a parameter between modules")

    def one(params: list[Tensor], x: Tensor) -> Tensor:
        saved = [m._parameters[name] for m, name in slots]
        try:
            for (m, name), t in zip(slots, params, strict=True):
                m._parameters[name] = t
            return net(x)
        finally:
            for (m, name), t in zip(slots, saved, strict=True):
                m._parameters[name] = t

    return torch.func.vmap(one)


class StackedOptimizer:
    """One optimiser over parameters stacked on a leading replica axis, standing in for K replicas' optimisers.

    ``optimizers``: the K replicas' optimisers of one role (same class, hyperparameters and parameter
    layout). Every parameter p_k of replica k becomes the view θ[k] of a new leaf θ [K, ...]
    (``p_k.data = θ[k]``: same Parameter object, storage shared), and one optimiser of the same class with
    the same hyperparameters steps the θ's. Elementwise optimisers (Adam, SGD with momentum) make this K
    independent optimisers; the learning rate is copied from replica 0's optimiser before each step (LR
    schedules act on the replicas' optimisers).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        first = optimizers[0]
        if any(type(o) is not type(first) or len(o.param_groups) != len(first.param_groups) for o in optimizers):
            raise ValueError("StackedOptimizer: the replicas' optimisers differ in class or parameter groups")
        self.replicas = optimizers
        self.stacked: list[list[Tensor]] = []  # [group][param] θ [K, ...]
        groups = []
        for gi, group in enumerate(first.param_groups):
            members = [o.param_groups[gi]["params"] for o in optimizers]
            if any(len(m) != len(group["params"]) for m in members):
                raise ValueError("StackedOptimizer: the replicas' parameter groups differ in size")
            thetas = []
            for pi in range(len(group["params"])):
                params = [m[pi] for m in members]
                theta = torch.stack([p.detach() for p in params]).requires_grad_(True)
                for k, p in enumerate(params):
                    p.data = theta.data[k]
                thetas.append(theta)
            self.stacked.append(thetas)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": thetas})
        self.optimizer = type(first)(groups, **first.defaults)

    @property
    def params(self) -> list[Tensor]:
        return [t for g in self.stacked for t in g]

    def replica_params(self, k: int) -> list[Tensor]:
        return [p for g in self.replicas[k].param_groups for p in g["params"]]

    def gather_grads(self, live: list[int]) -> list[Tensor]:
        """θ.grad = stack_k(p_k.grad) (zeros for replicas not in ``live`` or without a gradient)."""
        grads = []
        num = len(self.replicas)
        per_replica = [self.replica_params(k) for k in range(num)]
        for j, theta in enumerate(self.params):
            parts = []
            for k in range(num):
                g = per_replica[k][j].grad if k in live else None
                parts.append(torch.zeros_like(theta[k]) if g is None else g)
            theta.grad = torch.stack(parts)
            grads.append(theta.grad)
        return grads

    def step(self) -> None:
        for group, source in zip(self.optimizer.param_groups, self.replicas[0].param_groups, strict=True):
            group["lr"] = source["lr"]
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


@dataclass
class Replica:
    """One seed of a pack: its env runner, learner, metrics and failure."""

    seed: int
    runner: Any
    learner: Any
    metrics: MetricsLogger = field(default_factory=lambda: MetricsLogger(root=True))
    failed: str | None = None
    """Why the replica stopped (None: live)."""
    reported: bool = False
    """Its failure was returned in a result (once)."""
    sync_plan: tuple | None = None


class ReplicaPack:
    """K replicas trained in lockstep with stacked optimisers (see the module docstring)."""

    def __init__(self, replicas: list[Replica], config: Any, vectorise: bool = True, pack_actions: bool = True):
        """``vectorise``: use the vmapped losses (:meth:`_vectorised_updates`) when every replica's learner
        supports them (``supports_vectorised_losses``); False: always the per-replica loop.
        ``pack_actions``: sample all live replicas' env steps with one action pass (:meth:`_packed_sample`)
        when every replica's env runner supports it (``supports_packed_actions``); False: each runner's own
        ``sample`` in turn."""
        self.replicas = replicas
        self.config = config
        learners = [r.learner for r in replicas]
        names = [name for name, _ in learners[0].get_optimizers_for_module(DEFAULT_MODULE_ID)]
        self.optimizers: dict[str, StackedOptimizer] = {}
        for name in names:
            per = [dict(lrn.get_optimizers_for_module(DEFAULT_MODULE_ID))[name] for lrn in learners]
            self.optimizers[name] = StackedOptimizer(per)
        self._bad = torch.zeros(len(replicas), dtype=torch.bool, device=learners[0]._device)
        self.vectorised = bool(vectorise) and all(
            getattr(lrn, "supports_vectorised_losses", lambda: False)() for lrn in learners)
        self._stacked_params: dict[str, Tensor] = {}
        if self.vectorised:
            self._stack_module_params()
        runners = [r.runner for r in replicas]
        self.packed_actions = bool(pack_actions) and len({type(r) for r in runners}) == 1 and all(
            r.supports_packed_actions() for r in runners)
        self._action_params: list[Tensor] = []
        self._action_members: list[Tensor] = []
        self._action_views: list[int] = []
        self._action_nets: list[int] = []
        self._action_pass: Any = None

    def _stack_module_params(self) -> None:
        """Every named parameter of the replicas' modules as one [K, ...] tensor, by name: the optimisers' θ
        for trainable ones; for the others (target networks) a new stacked tensor whose rows become the
        replicas' parameters (``p_k.data = T[k]``, so in-place target updates and loads write into T)."""
        mid = DEFAULT_MODULE_ID
        modules = [r.learner.module[mid].unwrapped() for r in self.replicas]
        theta_of = {id(p): theta for opt in self.optimizers.values()
                    for p, theta in zip(opt.replica_params(0), opt.params, strict=True)}
        named = [dict(m.named_parameters()) for m in modules]
        for name, p0 in named[0].items():
            theta = theta_of.get(id(p0))
            if theta is None:
                theta = torch.stack([n[name].detach() for n in named])
                for k, n in enumerate(named):
                    n[name].data = theta[k]
            self._stacked_params[name] = theta

    @classmethod
    def build(cls, algorithm: Any) -> ReplicaPack:
        """Replica 0 = ``algorithm``'s local env runner and learner; the others built from config copies."""
        from algorithms.offpolicy.inprocess import build_runner_and_learner

        cfg = algorithm.config
        seeds = [int(s) for s in cfg.replica_seeds]
        learner = getattr(algorithm.learner_group, "_learner", None)
        if learner is None or algorithm.env_runner is None:
            raise ValueError("seed packing needs the learner and env runner in the trial's process "
                             "(num_learners 0, num_env_runners 0)")
        replicas = [Replica(seeds[0], algorithm.env_runner, learner)]
        for seed in seeds[1:]:
            c = cfg.copy(copy_frozen=False)
            c.replica_seeds = None
            c.debugging(seed=seed)
            runner, lrn = build_runner_and_learner(c)
            replicas.append(Replica(seed, runner, lrn))
        return cls(replicas, cfg)

    @property
    def live(self) -> list[int]:
        return [k for k, r in enumerate(self.replicas) if r.failed is None]

    # -- one round of the core loop --------------------------------------------------------------
    def sample(self) -> int:
        """Sample ``rollout_fragment_length`` vector steps on every live replica and insert them into its
        replay; returns the env steps one replica sampled. With ``packed_actions`` the replicas step together
        (:meth:`_packed_sample`), else each runner's ``sample`` in turn."""
        if self.packed_actions:
            return self._packed_sample()
        n = 0
        for k in self.live:
            r = self.replicas[k]
            data = r.runner.sample()
            r.learner.insert(data)
            n = int(data["reward"].size)
        return n

    def _packed_sample(self) -> int:
        """One sample call of every live replica, the replicas stepping together: per vector step t, one action
        pass for all of them (the runner class's ``packed_actions``: the action network, e.g. Q_θ̂, of every
        replica in one ``torch.func.vmap`` call of ``functional_call`` over the runners' stacked parameters
        A [K, ...], then each replica's own exploration draws from its own generator), then each replica's
        envs step (``step_envs``); at the end each replica's data go into its own replay. Replica k's envs,
        generator draws and replay writes are those of its own ``sample`` (the replicas share no state, so
        interleaving their steps changes nothing); the vmapped pass gives each row the outputs of that
        replica's own network (tested bit for bit against the per-runner path, tests/test_packing.py)."""
        live = self.live
        runners = [self.replicas[k].runner for k in live]
        forward = self._action_forward(live)
        rollouts = [r.begin_sample() for r in runners]
        explore = rollouts[0].explore
        packed_actions = type(runners[0]).packed_actions
        for t in range(rollouts[0].steps):
            actions = packed_actions(runners, explore, forward)
            for r, rollout, a in zip(runners, rollouts, actions, strict=True):
                r.step_envs(rollout, t, a)
        n = 0
        for k, r, rollout in zip(live, runners, rollouts, strict=True):
            data = r.end_sample(rollout)
            self.replicas[k].learner.insert(data)
            n = int(data["reward"].size)
        return n

    def _action_forward(self, live: list[int]) -> Callable[[list[int], Tensor], Tensor]:
        """``forward(rows, x)`` for ``packed_actions``: the action network of the live replicas ``live[rows]``
        on x [R, E, ...], one ``torch.func.vmap`` call over rows of the stacked parameters A [K, ...]
        (:func:`stacked_forward`). Every runner's parameter p_k is the view A[k] (``p_k.data = A[k]``, so
        weight syncs and ``set_state``, which copy in place, write into A); the views are checked each call
        and rebuilt if a network or parameter was replaced."""
        nets = [r.runner.action_network() for r in self.replicas]
        if [id(n) for n in nets] != self._action_nets or \
                [p.data_ptr() for p in self._action_members] != self._action_views:
            per = [list(net.parameters()) for net in nets]
            self._action_params = []
            for j in range(len(per[0])):
                stacked = torch.stack([ps[j].detach() for ps in per])
                for k, ps in enumerate(per):
                    ps[j].data = stacked[k]
                self._action_params.append(stacked)
            self._action_members = [p for ps in per for p in ps]
            self._action_views = [p.data_ptr() for p in self._action_members]
            self._action_nets = [id(n) for n in nets]
            self._action_pass = stacked_forward(nets[0])
        params, vmapped, num = self._action_params, self._action_pass, len(self.replicas)

        def forward(rows: list[int], x: Tensor) -> Tensor:
            index = [live[i] for i in rows]
            p = params if len(index) == num else [t[torch.tensor(index)] for t in params]
            return vmapped(p, x)

        return forward

    def run_updates(self, num_updates: int, timesteps: dict[str, Any]) -> None:
        """``num_updates`` updates of every live replica: per replica its batch, its loss and gradients (all
        replicas in one vmapped call when ``vectorised``, :meth:`_vectorised_updates`; else replica by replica,
        :meth:`_looped_updates`), then the stacked per-replica clipping, one step of each stacked optimiser,
        each replica's network chain (weight decay, NaP) and target update."""
        live = self.live
        if num_updates <= 0 or not live:
            return
        mid = DEFAULT_MODULE_ID
        cfg = self.config
        learners = [self.replicas[k].learner for k in live]
        modules = [lrn.module[mid] for lrn in learners]
        pairs = [m.unwrapped().get_target_network_pairs() for m in modules]
        for lrn, m in zip(learners, modules, strict=True):
            if len(lrn.replay) == 0:
                raise RuntimeError("run_updates called on an empty replay: raise learning_starts")
            lrn.before_gradient_based_update(timesteps=timesteps)
            if not all(sub.training for sub in m.modules()):  # as OffPolicyLearner.run_updates
                m.train()
        clip = float(cfg.grad_clip) if cfg.grad_clip else None
        if self.vectorised:
            self._vectorised_updates(num_updates, live, learners, modules, pairs, clip)
        else:
            self._looped_updates(num_updates, live, learners, modules, pairs, clip)
        for lrn in learners:
            lrn.after_gradient_based_update(timesteps=timesteps)
        if bool(self._bad.any()):  # one host sync per call, not per update
            for k in self._bad.nonzero().flatten().tolist():
                if self.replicas[k].failed is None:
                    self.replicas[k].failed = "non-finite gradient norm: replica stopped"
            self._bad.zero_()

    def _after_step(self, learners: list, modules: list, pairs: list) -> None:
        """Each live replica's network chain (weight decay, NaP) and, every ``target_update_period`` of its
        updates, its target update."""
        cfg = self.config
        mid = DEFAULT_MODULE_ID
        for i, lrn in enumerate(learners):
            chain = getattr(lrn, "_net_updates", {}).get(mid)
            if chain is not None:
                chain.after_step(modules[i].unwrapped(), lrn._optimizers_of(mid), lrn._net_steps[mid])
                lrn._net_steps[mid] += 1
            if lrn.num_updates % int(cfg.target_update_period) == 0:
                update_target_networks(pairs[i], float(cfg.target_update_tau))

    def _looped_updates(self, num_updates: int, live: list[int], learners: list, modules: list, pairs: list,
                        clip: float | None) -> None:
        """Per update: each live replica's own batch, forward pass, ``compute_losses`` and
        ``compute_gradients`` (K passes), then the stacked clipping and optimiser steps."""
        mid = DEFAULT_MODULE_ID
        batch_size = int(self.config.train_batch_size_per_learner)
        for _ in range(num_updates):
            for lrn, m in zip(learners, modules, strict=True):
                batch = {mid: lrn.replay.sample(batch_size)}
                fwd_out = {mid: m._forward_train(batch[mid])}
                losses = lrn.compute_losses(fwd_out=fwd_out, batch=batch)
                lrn.compute_gradients(losses)
                lrn.num_updates += 1
                lrn._stat_counts[mid] += 1
                lrn.record(mid, total_loss=losses[mid])
            for name, opt in self.optimizers.items():
                norms = clip_per_replica_(opt.gather_grads(live), clip)
                for i, k in enumerate(live):
                    learners[i].record(mid, **{f"{name}_grad_norm": norms[k]})
                self._bad |= ~torch.isfinite(norms)
                opt.step()
            self._after_step(learners, modules, pairs)

    def _vectorised_updates(self, num_updates: int, live: list[int], learners: list, modules: list,
                            pairs: list, clip: float | None) -> None:
        """Per update, all live replicas' losses and gradients in one call:

        1. each live replica k samples its batch b_k from its own replay (its own generator: the batches
           of seed s_k unpacked) and the fields the loss reads are stacked, b [K, B, ...];
        2. ``torch.func.vmap`` of replica 0's learner's ``functional_loss`` over the replica axis of the
           stacked parameters (θ [K, ...], the optimisers' own leaves, and the target networks' stacked
           tensors; rows of live replicas only) and of b gives L_k(θ[k]; b_k) [K] and the statistics [K];
        3. one backward pass of Σ_k L_k: replica k's loss depends on no other replica's parameters, so
           ∂(Σ_j L_j)/∂θ[k] = ∂L_k/∂θ[k], replica k's own gradient, written by autograd straight into
           θ.grad [K, ...] (rows of replicas not live are zero);
        4. the stacked per-replica clipping and optimiser steps, network chains and target updates of the loop
           path. Each replica's statistics (total_loss, the loss's own, ``<optimizer>_grad_norm``) are summed
           over the call on [K] tensors and added to its learner's iteration sums once, so reduce_stats
           reports the per-update mean as unpacked (to float32 round-off: the sums run in another order).
        """
        mid = DEFAULT_MODULE_ID
        lead = learners[0]
        batch_size = int(self.config.train_batch_size_per_learner)
        module_config = lead.config.get_config_for_module(mid)
        keys = tuple(lead.VECTORISED_BATCH_KEYS)
        all_live = len(live) == len(self.replicas)
        index = torch.tensor(live, device=lead._device)
        params = self._stacked_params

        def one(p: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            return lead.functional_loss(module_id=mid, config=module_config, params=p, batch=b)

        losses_of = torch.func.vmap(one)
        thetas = [theta for opt in self.optimizers.values() for theta in opt.params]
        sums: dict[str, Tensor] = {}
        for _ in range(num_updates):
            batches = [lrn.replay.sample(batch_size) for lrn in learners]
            batch = {key: torch.stack([b[key] for b in batches]) for key in keys}
            for theta in thetas:
                theta.grad = None
            p = params if all_live else {n: t[index] for n, t in params.items()}
            losses, stats = losses_of(p, batch)
            losses.sum().backward()
            stats = {"total_loss": losses.detach(), **{n: v.detach() for n, v in stats.items()}}
            for name, opt in self.optimizers.items():
                grads = []
                for theta in opt.params:
                    if theta.grad is None:
                        theta.grad = torch.zeros_like(theta)
                    grads.append(theta.grad)
                norms = clip_per_replica_(grads, clip)
                self._bad |= ~torch.isfinite(norms)
                stats[f"{name}_grad_norm"] = norms if all_live else norms[index]
                opt.step()
            if sums:
                torch._foreach_add_(list(sums.values()), [stats[n] for n in sums])
            else:
                sums = {n: v.float().clone() for n, v in stats.items()}
            for lrn in learners:
                lrn.num_updates += 1
            self._after_step(learners, modules, pairs)
        for i, lrn in enumerate(learners):
            lrn._stat_counts[mid] += num_updates
            lrn.record(mid, **{n: v[i] for n, v in sums.items()})
        for opt in self.optimizers.values():  # each replica's parameters show its (clipped) last gradient
            for k in live:
                for p_k, theta in zip(opt.replica_params(k), opt.params, strict=True):
                    p_k.grad = theta.grad[k]

    def sync_weights(self) -> None:
        """Each live replica's learner module -> its env runner (parameters and buffers, in place)."""
        from algorithms.offpolicy.algorithm import _tensor_pairs

        for k in self.live:
            r = self.replicas[k]
            src, dst = r.learner.module[DEFAULT_MODULE_ID].unwrapped(), r.runner.module
            if r.sync_plan is None or r.sync_plan[0] is not src or r.sync_plan[1] is not dst:
                r.sync_plan = (src, dst, _tensor_pairs(src, dst))
            if r.sync_plan[2] is None:
                r.runner.set_state({"rl_module": r.learner.module[DEFAULT_MODULE_ID].get_state(inference_only=True)})
                continue
            with torch.no_grad():
                for (d_owner, d_name), (s_owner, s_name) in r.sync_plan[2]:
                    getattr(d_owner, d_name).copy_(getattr(s_owner, s_name))
            r.runner.on_weights_set()

    # -- results ---------------------------------------------------------------------------------
    def iteration_results(self, steps_per_replica: int, seconds: float) -> tuple[dict[str, Any], list, list]:
        """Per replica its result in the Algorithm's layout ({seed: {env_runners, learners, uncertainty,
        system, num_env_steps_sampled_lifetime} or {failed}}), plus the live replicas' env-runner and learner
        metrics for the pooled top level. A replica whose loss went non-finite this iteration is stopped."""
        out: dict[str, Any] = {}
        runner_metrics, learner_metrics = [], []
        for r in self.replicas:
            if r.failed is not None:
                if not r.reported:
                    out[str(r.seed)] = {FAILED_KEY: r.failed}
                    r.reported = True
                continue
            env_m = r.runner.get_metrics()
            learn_m = r.learner.reduce_stats()
            log = r.metrics
            log.aggregate([env_m], key=ENV_RUNNER_RESULTS)
            log.aggregate([learn_m], key=LEARNER_RESULTS)
            if hasattr(r.learner, "uncertainty_stats"):
                for name, value in r.learner.uncertainty_stats().items():
                    log.log_value(("uncertainty", name), value, window=1)
            log.log_value(("system", "env_steps_per_s"), steps_per_replica / max(seconds, 1e-9), window=1)
            log.log_value(("system", "num_updates_lifetime"), r.learner.num_updates, window=1)
            result = log.reduce(compile=True)
            result[NUM_ENV_STEPS_SAMPLED_LIFETIME] = int(
                (result.get(ENV_RUNNER_RESULTS) or {}).get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))
            bad = _non_finite_loss(result.get(LEARNER_RESULTS) or {})
            if bad is not None:
                r.failed, r.reported = f"{bad} at update {r.learner.num_updates}: replica stopped", True
                out[str(r.seed)] = {FAILED_KEY: r.failed}
                continue
            out[str(r.seed)] = result
            runner_metrics.append(copy.deepcopy(env_m))
            learner_metrics.append(copy.deepcopy(learn_m))
        return out, runner_metrics, learner_metrics

    # -- state -------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Replicas 1..K-1 (learner and sampler state), every replica's metrics and failure, the stacked
        optimisers (replica 0's learner and runner are in the Algorithm's own state)."""
        return {
            "seeds": [r.seed for r in self.replicas],
            "failed": [(r.failed, r.reported) for r in self.replicas],
            "metrics": [r.metrics.get_state() for r in self.replicas],
            "learners": [r.learner.get_state() for r in self.replicas[1:]],
            "runners": [r.runner.get_state() for r in self.replicas[1:]],
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        seeds = [r.seed for r in self.replicas]
        if list(state["seeds"]) != seeds:
            raise ValueError(f"checkpoint packs seeds {state['seeds']}; this trial packs {seeds}")
        for r, (failed, reported), metrics in zip(self.replicas, state["failed"], state["metrics"], strict=True):
            r.failed, r.reported = failed, reported
            r.metrics.set_state(metrics)
        for r, lstate, rstate in zip(self.replicas[1:], state["learners"], state["runners"], strict=True):
            r.learner.set_state(lstate)
            r.runner.set_state(rstate)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])


def _non_finite_loss(learner_results: dict[str, Any]) -> str | None:
    """The first ``<module>/<...loss...>`` value that is NaN or infinite, as ``learner/<name> is <value>``."""
    for module in learner_results.values():
        if not isinstance(module, dict):
            continue
        for name, value in module.items():
            if "loss" in name and isinstance(value, int | float) and not math.isfinite(value):
                return f"learner/{name} is {value}"
    return None
