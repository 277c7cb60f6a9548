"""Nonstationary supervised benchmarks on scikit-learn's bundled digits (8x8 images, 10 classes; no download).

A *task sequence*: every ``task_steps`` (T) optimiser steps the task changes, ``num_tasks`` times.

- ``digits_random_labels``: memorise ``num_examples`` images with labels drawn uniformly from 10
  classes, redrawn at every task (Lyle et al. 2023; Kumar et al. 2023).
- ``digits_permuted``: the true labels, pixels shuffled by a new random permutation at every task
  (Goodfellow et al. 2013; Dohare et al. 2024).
- ``digits_shifting_regression``: memorise per-example targets y = μ_k + σ·z, z ~ N(0, 1), with a new
  draw of z and of the large mean μ_k ~ U[−target_mean, target_mean] at every task ("large regression
  target scale", Lyle et al. 2024, arXiv 2402.18762).

The *continuing* network trains through the whole sequence. With ``fresh_reference`` a freshly
initialised network with the same config (new init at each task) trains on the same minibatches of the
current task in parallel: the reference that trainability is judged against (Abel et al. 2023).

Result keys (every iteration; "fresh" = the fresh reference), measured on the task's full data set
after the iteration's steps:

- ``train/task_id``: index k of the current task (0-based).
- ``train/loss``, ``train/fresh_loss``: mean training loss over the iteration's minibatches
  (cross-entropy, or mean squared error for regression).
- classification: ``train/accuracy``, ``train/fresh_accuracy``: accuracy on the task's data set.
- regression: ``train/mse`` and ``train/r2`` = 1 − MSE / Var(y) on the task's data set (and fresh_).
- the trainability ratio continuing / fresh on the current task: ``train/accuracy_ratio`` (1 = as
  trainable as a fresh net, lower is worse) or, for regression, ``train/mse_ratio`` (higher is worse).
  Reported every iteration, so Tune can use it as the trial metric; at the last iteration it is the
  final task's ratio.
- at the last iteration of each task (T is a multiple of steps_per_iteration):
  ``train/task_final_<score>`` and ``train/task_final_fresh_<score>`` for each score above, and
  ``train/task_final_accuracy_ratio`` (or ``train/task_final_mse_ratio``).
- ``plasticity/<m>/effective_rank``, ``plasticity/<m>/dormant_ratio``, ``plasticity/<m>/weight_norm``
  for m = ``continuing`` and ``fresh``, every ``plasticity_every`` iterations, on the first
  ``probe_size`` inputs of the current task, computed with :mod:`algorithms.diagnostics.plasticity`
  exactly as the ``plasticity`` diagnostic aggregates a module (same keys, same definitions):
  effective rank averaged over the hidden (activation) layers, dormant ratio (τ = ``dormant_tau``)
  pooled over all hidden units, ‖θ‖ = sqrt of the summed squares of all weight matrices. Enabling the
  diagnostic as well adds its per-layer keys (its probe is the first task's inputs; its values win).
- ``done`` is True on the last iteration of the last task; calling :meth:`train` again is an error.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from algorithms.networks.builders import Network, build_mlp
from algorithms.networks.config import NetworkConfig
from algorithms.networks.updates import Chain, network_updates
from algorithms.tasks.base import Task, TaskConfig


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Standardised digits: X [1797, 64] float32 (per-pixel zero mean, unit std), y [1797] int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float64) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 0.1)  # +0.1: border pixels are almost always 0
    return x.astype(np.float32), data.target.astype(np.int64)


class DigitsSequenceConfig(TaskConfig):
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    """The network and its update pieces (NaP, weight decay, LR schedule); the same for both nets."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam | sgd."""
    lr: float = Field(1e-3, gt=0)
    """Base learning rate (the network's lr_schedule multiplies it)."""
    batch_size: int = Field(64, ge=1)
    """Examples per optimiser step."""
    task_steps: int = Field(500, ge=1)
    """T: optimiser steps per task."""
    num_tasks: int = Field(10, ge=1)
    """Length of the task sequence."""
    steps_per_iteration: int = Field(100, ge=1)
    """Optimiser steps per iteration (must divide task_steps)."""
    num_examples: int = Field(512, ge=16, le=1797)
    """Size of the data set (a seeded subset of the 1797 digits)."""
    fresh_reference: bool = True
    """Train a freshly initialised network on each task in parallel, as the reference."""
    plasticity_every: int = Field(1, ge=0)
    """Report plasticity/... metrics every k iterations (0: never)."""
    probe_size: int = Field(256, ge=1)
    """Probe inputs for the plasticity metrics (and probe_inputs default)."""
    dormant_tau: float = Field(0.025, ge=0)
    """τ of the dormant ratio."""

    @model_validator(mode="after")
    def _check(self) -> DigitsSequenceConfig:
        if self.task_steps % self.steps_per_iteration:
            raise ValueError(
                f"task_steps ({self.task_steps}) must be a multiple of steps_per_iteration "
                f"({self.steps_per_iteration}) so that tasks end at iteration ends"
            )
        return self


class DigitsRegressionConfig(DigitsSequenceConfig):
    target_mean: float = Field(100.0, ge=0)
    """Task means μ_k ~ U[−target_mean, target_mean]."""
    target_scale: float = Field(10.0, gt=0)
    """σ: spread of the per-example targets around μ_k."""


class _Learner:
    """One network with its optimiser and update pieces (NaP / decay / schedule)."""

    def __init__(self, cfg: DigitsSequenceConfig, out_dim: int, seed: int):
        self.net: Network = build_mlp(64, out_dim, cfg.network, seed=seed)
        if cfg.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        else:
            self.opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr)
        self.updates: Chain = network_updates(cfg.network, task_length=cfg.task_steps)
        self.updates.init(self.net, self.opt)

    def step(self, loss_fn, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        self.updates.before_step(self.net, self.opt, step)
        loss = loss_fn(self.net(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.updates.after_step(self.net, self.opt, step)
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "updates": self.updates.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.updates.load_state_dict(state["updates"])


class _DigitsSequence(Task):
    """Shared loop: task switching, the two learners, evaluation, metrics, checkpointing."""

    Config: ClassVar[type[TaskConfig]] = DigitsSequenceConfig
    out_dim: ClassVar[int] = 10
    ratio_name: ClassVar[str] = "accuracy"

    def __init__(self, config: DigitsSequenceConfig, seed: int, artifact_dir=None):
        super().__init__(config, seed, artifact_dir)
        x, y = _digits()
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(x))[: config.num_examples]
        self.x_base = torch.from_numpy(x[idx])
        self.y_base = torch.from_numpy(y[idx])
        # One generator for everything random in the data stream (task draws, minibatches).
        self.gen = torch.Generator().manual_seed(seed)
        self.task_id = -1
        self.continuing = _Learner(config, self.out_dim, self._init_seed("continuing", 0))
        self.fresh: _Learner | None = None
        self.task_state: dict[str, torch.Tensor] = {}
        self._start_task(0)

    # -- task definition hooks -------------------------------------------------------------------
    def _draw_task(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _inputs(self) -> torch.Tensor:
        return self.x_base

    def _targets(self) -> torch.Tensor:
        raise NotImplementedError

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y)

    @torch.no_grad()
    def _evaluate(self, net: nn.Module) -> dict[str, float]:
        """accuracy = mean_i [argmax f(x_i) = y_i] on the task's data set."""
        return {"accuracy": float((net(self._inputs()).argmax(-1) == self._targets()).float().mean())}

    # -- loop --------------------------------------------------------------------------------------
    def _init_seed(self, which: str, task: int) -> int:
        return int(np.random.SeedSequence([self.seed, 0 if which == "continuing" else 1, task]).generate_state(1)[0])

    def _start_task(self, k: int) -> None:
        self.task_id = k
        self.task_state = self._draw_task()
        if self.config.fresh_reference:
            self.fresh = _Learner(self.config, self.out_dim, self._init_seed("fresh", k))

    def train(self) -> dict[str, Any]:
        c: DigitsSequenceConfig = self.config
        if self.steps >= c.task_steps * c.num_tasks:
            raise RuntimeError(f"{type(self).__name__}: all num_tasks={c.num_tasks} tasks are done")
        if self.steps > 0 and self.steps % c.task_steps == 0:
            self._start_task(self.steps // c.task_steps)
        x_all, y_all = self._inputs(), self._targets()
        losses, fresh_losses = [], []
        for _ in range(c.steps_per_iteration):
            idx = torch.randint(0, len(x_all), (c.batch_size,), generator=self.gen)
            x, y = x_all[idx], y_all[idx]
            step_in_task = self.steps % c.task_steps
            losses.append(self.continuing.step(self._loss, x, y, self.steps))
            if self.fresh is not None:
                fresh_losses.append(self.fresh.step(self._loss, x, y, step_in_task))
            self.steps += 1

        out: dict[str, Any] = {"train/task_id": self.task_id, "train/loss": float(np.mean(losses))}
        scores = self._evaluate(self.continuing.net)
        out.update({f"train/{k}": v for k, v in scores.items()})
        if self.fresh is not None:
            fresh_scores = self._evaluate(self.fresh.net)
            out["train/fresh_loss"] = float(np.mean(fresh_losses))
            out.update({f"train/fresh_{k}": v for k, v in fresh_scores.items()})
            out[f"train/{self.ratio_name}_ratio"] = scores[self.ratio_name] / max(fresh_scores[self.ratio_name], 1e-12)
        if self.steps % c.task_steps == 0:
            out.update({f"train/task_final_{k}": v for k, v in scores.items()})
            if self.fresh is not None:
                out.update({f"train/task_final_fresh_{k}": v for k, v in fresh_scores.items()})
                out[f"train/task_final_{self.ratio_name}_ratio"] = out[f"train/{self.ratio_name}_ratio"]
        iteration = self.steps // c.steps_per_iteration
        if c.plasticity_every and iteration % c.plasticity_every == 0:
            out.update(self._plasticity(self.continuing.net, "continuing"))
            if self.fresh is not None:
                out.update(self._plasticity(self.fresh.net, "fresh"))
        out["done"] = self.steps >= c.task_steps * c.num_tasks
        return out

    @torch.no_grad()
    def _plasticity(self, net: Network, name: str) -> dict[str, float]:
        """Per-module aggregates with the definitions of the ``plasticity`` diagnostic (same keys)."""
        from algorithms.diagnostics.plasticity import (
            capture_activations,
            dormant_ratio,
            effective_rank,
            weight_layers,
        )

        probe = self.probe_inputs(self.config.probe_size)
        acts = list(capture_activations(net, lambda: net(probe)).values())
        weights = weight_layers(net).values()
        return {
            f"plasticity/{name}/effective_rank": float(np.mean([effective_rank(h) for h in acts])),
            f"plasticity/{name}/dormant_ratio": dormant_ratio(acts, self.config.dormant_tau),
            f"plasticity/{name}/weight_norm": float(torch.sqrt(sum(w.detach().double().pow(2).sum() for w in weights))),
        }

    # -- interface for diagnostics and checkpoints ---------------------------------------------------
    def modules(self) -> dict[str, Any]:
        mods: dict[str, Any] = {"continuing": self.continuing.net}
        if self.fresh is not None:
            mods["fresh"] = self.fresh.net
        return mods

    def probe_inputs(self, n: int) -> torch.Tensor:
        """The first n examples of the data set, as the current task presents them (fixed per task)."""
        return self._inputs()[:n]

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "task_id": self.task_id,
            "gen": self.gen.get_state(),
            "task_state": {k: v.clone() for k, v in self.task_state.items()},
            "continuing": self.continuing.state_dict(),
            "fresh": self.fresh.state_dict() if self.fresh is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.task_id = state["task_id"]
        self.gen.set_state(state["gen"])
        self.task_state = {k: v.clone() for k, v in state["task_state"].items()}
        self.continuing.load_state_dict(state["continuing"])
        if state["fresh"] is not None:
            self.fresh = _Learner(self.config, self.out_dim, self._init_seed("fresh", self.task_id))
            self.fresh.load_state_dict(state["fresh"])
        else:
            self.fresh = None


class DigitsRandomLabels(_DigitsSequence):
    """Random-label memorisation: labels ~ U{0..9} per example, redrawn every T steps."""

    Config = DigitsSequenceConfig

    def _draw_task(self) -> dict[str, torch.Tensor]:
        return {"labels": torch.randint(0, 10, (len(self.x_base),), generator=self.gen)}

    def _targets(self) -> torch.Tensor:
        return self.task_state["labels"]


class DigitsPermuted(_DigitsSequence):
    """Permuted digits: true labels, a new random pixel permutation every T steps."""

    Config = DigitsSequenceConfig

    def _draw_task(self) -> dict[str, torch.Tensor]:
        perm = torch.randperm(64, generator=self.gen)
        return {"permutation": perm, "inputs": self.x_base[:, perm].contiguous()}

    def _inputs(self) -> torch.Tensor:
        return self.task_state["inputs"]

    def _targets(self) -> torch.Tensor:
        return self.y_base


class DigitsShiftingRegression(_DigitsSequence):
    """Shifting-target regression: y = μ_k + σ·z per example; μ_k and z redrawn every T steps."""

    Config = DigitsRegressionConfig
    out_dim = 1
    ratio_name = "mse"

    def _draw_task(self) -> dict[str, torch.Tensor]:
        c: DigitsRegressionConfig = self.config
        mu = (torch.rand((), generator=self.gen) * 2 - 1) * c.target_mean
        z = torch.randn(len(self.x_base), 1, generator=self.gen)
        return {"targets": mu + c.target_scale * z}

    def _targets(self) -> torch.Tensor:
        return self.task_state["targets"]

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out, y)

    @torch.no_grad()
    def _evaluate(self, net: nn.Module) -> dict[str, float]:
        """mse = mean_i (f(x_i) − y_i)², r2 = 1 − mse / Var(y), on the task's data set."""
        y = self._targets()
        mse = float((net(self._inputs()) - y).pow(2).mean())
        return {"mse": mse, "r2": 1.0 - mse / float(y.var(unbiased=False))}
