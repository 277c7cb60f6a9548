"""Small composable pieces applied around ANY torch optimiser (Optax style): NaP, weight decay, LR schedules,
and the plasticity interventions of :mod:`algorithms.networks.interventions` (ReDo, Shrink & Perturb, resets).

Each piece has ``init(module, optimizers)``, ``before_step(module, optimizers, step)`` and
``after_step(module, optimizers, step)`` plus ``state_dict`` / ``load_state_dict``; :class:`Chain`
composes them. ``step`` is the index (0, 1, ...) of the optimiser step being taken. A plain loop::

    net = build_mlp(64, 10, cfg, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    updates = network_updates(cfg)          # Chain(LRSchedule, DecoupledWeightDecay, NaP) as configured
    updates.init(net, opt)
    for step in range(n):
        updates.before_step(net, opt, step)  # sets each param group's lr = base_lr · m(step)
        opt.zero_grad(); loss(net).backward(); opt.step()
        updates.after_step(net, opt, step)   # decoupled decay, then projection

The math lives in pure functions (``nap_project_``, ``decoupled_weight_decay_``,
``warmup_cosine_multiplier``, ``lr_multiplier``); the pieces only keep their state.
Sources: Normalize-and-Project (Lyle et al. 2024, arXiv 2407.01800); LayerNorm + L2 / L2-Init (Lyle et
al. 2024, arXiv 2402.18762); decoupled decay (Loshchilov & Hutter 2019, as in ``optax.adamw``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from algorithms.networks.builders import trainable_networks
from algorithms.networks.config import LRScheduleConfig, NetworkConfig, WeightDecayConfig
from algorithms.networks.interventions import ReDo, Reset, ShrinkPerturb

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


def _as_list(optimizers: Optimizers) -> list[torch.optim.Optimizer]:
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)


# --------------------------------------------------------------------------------------------------
# Normalize-and-Project
# --------------------------------------------------------------------------------------------------


def nap_groups(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameter groups NaP projects, by qualified name.

    Each hidden layer's weight is its own group; each norm layer's scale and offset form one joint
    group; in a grouped network (:mod:`algorithms.networks.grouped`) each tower's slice of them is. Output
    layers, biases of un-normalised layers and frozen (target) networks are left out.
    """
    groups: dict[str, list[nn.Parameter]] = {}
    for prefix, net in trainable_networks(module):
        pre = f"{prefix}." if prefix else ""
        for name, layer in net.named_hidden_layers():
            if hasattr(layer, "per_group"):  # grouped towers: each tower's weight on its own
                groups.update({f"{pre}{name}.weight[{g}]": ps for g, ps in enumerate(layer.per_group())})
            else:
                groups[f"{pre}{name}.weight"] = [layer.weight]
        for name, norm in net.named_norm_layers():
            if hasattr(norm, "per_group"):
                groups.update({f"{pre}{name}[{g}]": ps for g, ps in enumerate(norm.per_group())})
                continue
            params = [p for p in norm.parameters()]
            if params:
                groups[f"{pre}{name}"] = params
    return groups


def group_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Joint Frobenius norm sqrt(sum_p ||p||²) of a parameter group."""
    return torch.sqrt(sum(p.detach().pow(2).sum() for p in params))


def nap_initial_norms(module: nn.Module) -> dict[str, float]:
    """||W0|| for each NaP group of ``module`` (call once, right after initialisation)."""
    return {name: float(group_norm(params)) for name, params in nap_groups(module).items()}


@torch.no_grad()
def project_to_norm_(params: Sequence[torch.Tensor], target_norm: float) -> None:
    """In place: P <- target · P / ||P|| for the group P = (p_1, ..., p_n) (joint Frobenius norm)."""
    scale = target_norm / group_norm(params).clamp_min(1e-12)
    for p in params:
        p.mul_(scale)


@torch.no_grad()
def nap_project_(module: nn.Module, init_norms: dict[str, float]) -> None:
    """In place: W <- ||W0|| · W / ||W|| for every NaP group (joint norm for norm scale/offset).

    Normalize-and-Project (Lyle et al. 2024, arXiv 2407.01800, Alg. 1). For a hidden layer followed by a
    LayerNorm/RMSNorm this leaves the function unchanged and keeps the effective learning rate
    (≈ η/||W||² for SGD) fixed.
    """
    for name, params in nap_groups(module).items():
        if name not in init_norms:
            raise KeyError(f"nap_project_: no initial norm for parameter group {name!r}")
        project_to_norm_(params, init_norms[name])


class NaP:
    """Project hidden weights back to their initial norms every ``every`` optimiser steps."""

    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"network.nap_every must be >= 1, got {every}")
        self.every = every
        self.init_norms: dict[str, float] = {}

    def init(self, module: nn.Module, optimizers: Optimizers) -> None:
        self.init_norms = nap_initial_norms(module)

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        pass

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        if (step + 1) % self.every == 0:
            nap_project_(module, self.init_norms)

    def state_dict(self) -> dict[str, Any]:
        return {"init_norms": dict(self.init_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init_norms = dict(state["init_norms"])


# --------------------------------------------------------------------------------------------------
# Decoupled weight decay: L2 (towards zero) and L2-Init (towards the initial weights)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def decoupled_weight_decay_(param: torch.Tensor, lr: float, coef: float, ref: torch.Tensor | None) -> None:
    """In place: θ <- θ − lr·λ·(θ − θ_ref), θ_ref = 0 when ``ref`` is None (L2) or θ_0 (L2-Init).

    Decoupled from the gradient step (Loshchilov & Hutter 2019) and scaled by the current learning
    rate, as ``optax.adamw`` / ``torch.optim.AdamW`` do; L2-Init as in Kumar et al. 2023 / Lyle et al. 2024.
    """
    if ref is None:
        param.mul_(1.0 - lr * coef)
    else:
        param.sub_(lr * coef * (param - ref))


class DecoupledWeightDecay:
    """Decay every parameter the optimisers update, after each step, with its group's current lr."""

    def __init__(self, kind: str, coef: float):
        if kind not in ("l2", "l2_init"):
            raise ValueError(f"network.weight_decay.kind: unknown value {kind!r}; allowed: ['l2', 'l2_init', 'none']")
        self.kind = kind
        self.coef = coef
        self.refs: list[list[list[torch.Tensor]]] = []  # [optimizer][group][param] initial values

    def init(self, module: nn.Module, optimizers: Optimizers) -> None:
        if self.kind == "l2_init":
            self.refs = [
                [[p.detach().clone() for p in g["params"]] for g in opt.param_groups] for opt in _as_list(optimizers)
            ]

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        pass

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        for i, opt in enumerate(_as_list(optimizers)):
            for j, group in enumerate(opt.param_groups):
                lr = float(group["lr"])
                for k, p in enumerate(group["params"]):
                    ref = self.refs[i][j][k] if self.kind == "l2_init" else None
                    decoupled_weight_decay_(p, lr, self.coef, ref)

    def state_dict(self) -> dict[str, Any]:
        return {"refs": [[[t.clone() for t in g] for g in o] for o in self.refs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refs = [[[t.clone() for t in g] for g in o] for o in state["refs"]]


# --------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------


def warmup_cosine_multiplier(step: int, warmup_steps: int, total_steps: int, final_fraction: float) -> float:
    """m(t) = (t+1)/W for t < W; then f + (1−f)·½·(1 + cos(π·min(1, (t−W)/(T−W)))).

    Linear warm-up to 1 over W steps (the last warm-up step reaches 1), then cosine decay to f at
    t = T, held afterwards (Loshchilov & Hutter 2017, SGDR; NaP uses it restarted per task).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(step: int, cfg: LRScheduleConfig) -> float:
    """The schedule's multiplier at ``step`` (t mod task_length when restarting at task boundaries)."""
    if cfg.kind == "constant":
        return 1.0
    if cfg.restart_at_task_boundary:
        if cfg.task_length is None:
            raise ValueError("network.lr_schedule.restart_at_task_boundary needs lr_schedule.task_length")
        step = step % cfg.task_length
    total = cfg.total_steps if cfg.total_steps is not None else cfg.task_length
    if total is None:
        raise ValueError("network.lr_schedule.kind=warmup_cosine needs lr_schedule.total_steps (or task_length)")
    if total <= cfg.warmup_steps:
        raise ValueError(f"network.lr_schedule: total steps {total} must exceed warmup_steps {cfg.warmup_steps}")
    return warmup_cosine_multiplier(step, cfg.warmup_steps, total, cfg.final_fraction)


class LRSchedule:
    """Sets each param group's lr to base_lr · m(step) before every step (base = lr at ``init``)."""

    def __init__(self, cfg: LRScheduleConfig):
        self.cfg = cfg
        self.base_lrs: list[list[float]] = []

    def init(self, module: nn.Module, optimizers: Optimizers) -> None:
        self.base_lrs = [[float(g["lr"]) for g in opt.param_groups] for opt in _as_list(optimizers)]

    def set_lr(self, optimizers: Optimizers, step: int) -> float:
        m = lr_multiplier(step, self.cfg)
        for opt, bases in zip(_as_list(optimizers), self.base_lrs):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * m
        return m

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        self.set_lr(optimizers, step)

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": [list(b) for b in self.base_lrs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lrs = [list(b) for b in state["base_lrs"]]


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------


class UpdatePiece(Protocol):
    def init(self, module: nn.Module, optimizers: Optimizers) -> None: ...

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None: ...

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Chain:
    """Pieces applied in order: ``before_step`` first to last, ``after_step`` first to last."""

    def __init__(self, *pieces: UpdatePiece):
        self.pieces = list(pieces)

    def init(self, module: nn.Module, optimizers: Optimizers) -> None:
        for p in self.pieces:
            p.init(module, optimizers)

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        for p in self.pieces:
            p.before_step(module, optimizers, step)

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        for p in self.pieces:
            p.after_step(module, optimizers, step)

    def find(self, kind: type) -> Any | None:
        return next((p for p in self.pieces if isinstance(p, kind)), None)

    def metrics(self) -> dict[str, float]:
        """Counters of the pieces that keep them (e.g. ``redo_units_reset``, ``resets``)."""
        out: dict[str, float] = {}
        for p in self.pieces:
            if callable(getattr(p, "metrics", None)):
                out.update(p.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"pieces": [p.state_dict() for p in self.pieces]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p, s in zip(self.pieces, state["pieces"], strict=True):
            p.load_state_dict(s)


def weight_decay_piece(cfg: WeightDecayConfig) -> DecoupledWeightDecay | None:
    return None if cfg.kind == "none" or cfg.coef == 0 else DecoupledWeightDecay(cfg.kind, cfg.coef)


def network_updates(cfg: NetworkConfig, *, task_length: int | None = None) -> Chain:
    """The pieces ``cfg`` asks for, in the order schedule -> weight decay -> reset -> shrink & perturb -> ReDo
    -> NaP.

    Decay and the interventions run before projection so that projected groups end each step exactly at
    their initial norm. ``task_length`` fills ``lr_schedule.task_length`` when the spec left it out.
    """

    pieces: list[UpdatePiece] = []
    sched = cfg.lr_schedule
    if sched.kind != "constant":
        if sched.task_length is None and task_length is not None:
            sched = sched.model_copy(update={"task_length": task_length})
        lr_multiplier(0, sched)  # fail early on an incomplete schedule
        pieces.append(LRSchedule(sched))
    wd = weight_decay_piece(cfg.weight_decay)
    if wd is not None:
        pieces.append(wd)
    if cfg.reset is not None:
        pieces.append(Reset(cfg.reset.every, cfg.reset.layers, cfg.reset.k, cfg.reset.seed))
    if cfg.shrink_perturb is not None:
        sp = cfg.shrink_perturb
        pieces.append(ShrinkPerturb(sp.every, sp.shrink, sp.perturb, sp.seed))
    if cfg.redo is not None:
        pieces.append(ReDo(cfg.redo.every, cfg.redo.tau, cfg.redo.seed))
    if cfg.nap:
        pieces.append(NaP(cfg.nap_every))
    return Chain(*pieces)
