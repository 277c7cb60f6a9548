"""Diagnostic ``plasticity``: the plasticity metrics of ``plasticity.py`` for RLlib algorithms and tasks.

Spec: ``diagnostics: {plasticity: {every: 10, probe_size: 512, tau: 0.025}}`` (see
:class:`PlasticitySettings`). Every ``every`` iterations it computes, for each torch module:

Result keys (``<m>`` a module id / task module name, ``<layer>`` a qualified torch module name):

- ``plasticity/<m>/<layer>/<metric>`` per layer.
  Activation layers (outputs of activation modules, found with forward hooks on the probe set):
  ``dormant_ratio`` (τ = ``tau``), ``dead_ratio`` (τ = 0), ``feature_norm``, ``effective_rank``,
  ``srank`` (δ = ``srank_delta``), ``stable_rank``, ``approximate_rank``, ``feature_drift``.
  Weight layers (modules owning a ≥ 2-D weight): ``weight_norm``, ``grad_l1``, ``grad_l2``, and
  ``effective_lr`` for normalised layers (a norm layer right after them, or declared by the module).
- ``plasticity/<m>/<metric>`` per module and ``plasticity/<metric>`` over all modules, aggregated as:
  dormant_ratio / dead_ratio pooled over all units; effective_rank, srank, stable_rank,
  approximate_rank, feature_norm, feature_drift, effective_lr: mean over layers; weight_norm and
  grad_l2: sqrt of the sum of squares; grad_l1: sum; ``parameter_drift`` ‖θ_t − θ_{t−K}‖ over all
  trainable parameters since the previous computation; ``hessian_top_eigenvalue`` of each module's own loss
  (overall: the largest over modules; when enabled and available).
- ``plasticity/compute_s``: seconds spent computing the metrics this iteration.

Definitions used here (numbers come from the pure functions):

- The probe forward pass of an RLModule is ``module.plasticity_probe_forward(batch)`` if the module
  defines it, else ``forward_inference({obs})`` followed by ``compute_values`` for modules with the
  ValueFunctionAPI. Activation layers reached by neither (e.g. SAC's Q networks, which need actions)
  are not reported.
- Gradient norms are those of the gradient left on the parameters by the learner's last optimiser
  step (``p.grad`` of the last minibatch, after the learner's gradient postprocessing such as
  clipping). Learners that clear gradients after stepping report none.
- ``effective_lr`` is the closed form of :func:`plasticity.effective_learning_rate`: η/‖w‖² under
  SGD, η/‖w‖ under Adam-family optimisers (Adam, AdamW, Adamax, NAdam, RAdam), with η the
  optimiser's current learning rate for that parameter. Other optimisers: not reported.
- ``hessian_top_eigenvalue`` (``hessian: true``): power iteration on Hessian-vector products of the
  learner's loss for the module on the learner's last training minibatch. The loss is the learner's
  ``plasticity_probe_loss(module_id)`` if it defines one (our algorithms); else, for RLlib's built-in
  learners, the learner's own ``compute_loss_for_module`` on the last minibatch it trained on
  (recorded by wrapping ``compute_losses`` on the learner instance; the learner's metrics logger is
  swapped out while the probe loss runs so training stats are untouched). Learners without either,
  and iterations without a recorded batch, report no Hessian key.
- Weight metrics and parameter drift cover trainable parameters only (requires_grad): frozen target
  networks inside DQN/SAC modules are left out.
- Drift metrics compare with the previous computation (K = ``every`` iterations earlier); they start
  at the second computation and restart after a restore.

Everything runs inside the learner (``learner_group.foreach_learner``), so modules on remote learners
and GPUs work; with several learners the first learner's numbers are reported. The probe set is the
trial's shared :mod:`algorithms.diagnostics.probe` set, saved with the algorithm's checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from algorithms.diagnostics import plasticity as pm
from algorithms.diagnostics.probe import ProbeSet, install_probe_persistence, probe_set_for_algorithm
from algorithms.diagnostics.registry import register_diagnostic

logger = logging.getLogger(__name__)

PREFIX = "plasticity"
_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


class PlasticitySettings(BaseModel):
    """Settings of diagnostic ``plasticity`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(10, ge=1)
    """Compute the metrics every K training iterations (iterations K, 2K, ...)."""
    probe_size: int = Field(512, ge=2)
    """Number of probe observations."""
    tau: float = Field(0.025, ge=0)
    """Dormancy threshold τ of dormant_ratio (dead_ratio always uses τ = 0)."""
    srank_delta: float = Field(0.01, ge=0, lt=1)
    """δ of srank."""
    activations: bool = True
    """Activation metrics on the probe set (dormant/dead ratio, feature norm)."""
    ranks: bool = True
    """Rank metrics of each activation layer (effective_rank, srank, stable_rank, approximate_rank)."""
    weights: bool = True
    """Weight norms and effective learning rates."""
    gradients: bool = True
    """Gradient L1/L2 norms of the last optimiser step."""
    drift: bool = True
    """Parameter and feature drift since the previous computation."""
    hessian: bool = False
    """Top Hessian eigenvalue of the learner's loss (costs hessian_iters double-backward passes)."""
    hessian_iters: int = Field(20, ge=1)
    """Power-iteration steps for hessian_top_eigenvalue."""
    seed: int | None = None
    """Seed of the probe set (default: the algorithm's / task's seed)."""


@contextlib.contextmanager
def _single_thread():
    """Run torch ops on one intra-op thread, then restore the previous count.

    Why: the metric ops are small (SVDs of [probe, width] matrices); extra intra-op threads gain
    little and, on a busy machine, their spin-waiting multiplied the callback's CPU cost ~10x.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def _key(*parts: str) -> str:
    """Join key parts with '/', replacing characters MLflow rejects by '_'."""
    return "/".join(_KEY_BAD.sub("_", str(p)) for p in parts)


# ---------------------------------------------------------------------------------------------------
# One torch module -> metrics (framework-free apart from torch)


def module_plasticity_metrics(
    module: nn.Module,
    forward_fn: Callable[[], object] | None,
    settings: PlasticitySettings,
    *,
    previous: Mapping[str, Any] | None = None,
    optimizer_info: Mapping[int, tuple[float, str]] | None = None,
    hessian_loss_fn: Callable[[], Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """Metrics of one module: ({"<layer>/<metric>" and "<metric>": value}, snapshot, pool).

    ``forward_fn`` runs the module on the probe set (None: no activation metrics). ``previous`` is the
    snapshot returned by the previous call (for drift). ``optimizer_info`` maps id(parameter) to
    (learning rate, "sgd" | "adam"). ``pool`` holds per-layer values for aggregation across modules.
    """
    out: dict[str, float] = {}
    snapshot: dict[str, Any] = {"params": {}, "features": {}}
    pool: dict[str, list] = {"units": [], "layer": {}}
    s = settings

    acts: dict[str, Tensor] = {}
    if forward_fn is not None and s.activations:
        try:  # the probe must fit the module (raw env observations, see probe.py)
            with torch.no_grad():
                acts = pm.capture_activations(module, forward_fn)
        except Exception as e:  # noqa: BLE001 - any module error means: no activation metrics
            pool["forward_error"] = f"{type(e).__name__}: {e}"
        for layer, h in acts.items():
            h = h.detach().cpu()
            if h.dim() < 2 or h.shape[0] < 2:
                continue
            m = pm.layer_activation_metrics(h, s.tau, delta=s.srank_delta, ranks=s.ranks)
            units = h.shape[1]
            pool["units"].append((round(m["dormant_ratio"] * units), round(m["dead_ratio"] * units), units))
            if s.drift:
                snapshot["features"][layer] = h
                if previous and layer in previous.get("features", {}):
                    m["feature_drift"] = pm.feature_drift(h, previous["features"][layer])
            for name, v in m.items():
                out[_key(layer, name)] = v
                if name not in ("dormant_ratio", "dead_ratio"):
                    pool["layer"].setdefault(name, []).append(v)

    if s.weights or s.gradients:
        normalised = set(pm.normalised_layers(module)) if s.weights else set()
        for layer, w in pm.weight_layers(module).items():
            if s.weights:
                wn = pm.weight_norm(w)
                out[_key(layer, "weight_norm")] = wn
                pool["layer"].setdefault("weight_norm_sq", []).append(wn**2)
                info = (optimizer_info or {}).get(id(w))
                if layer in normalised and info is not None and wn > 0:
                    elr = pm.effective_learning_rate(info[0], wn, info[1])
                    out[_key(layer, "effective_lr")] = elr
                    pool["layer"].setdefault("effective_lr", []).append(elr)
            if s.gradients and w.grad is not None:
                l1, l2 = pm.gradient_norms(w.grad)
                out[_key(layer, "grad_l1")] = l1
                out[_key(layer, "grad_l2")] = l2
                pool["layer"].setdefault("grad_l1_sum", []).append(l1)
                pool["layer"].setdefault("grad_l2_sq", []).append(l2**2)

    if s.drift:
        params = {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
        snapshot["params"] = params
        prev = (previous or {}).get("params")
        if prev is not None and set(prev) == set(params):
            d = pm.parameter_drift(params, prev)
            pool["param_drift_sq"] = [d**2]

    if s.hessian and hessian_loss_fn is not None:
        params = [p for p in module.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0 if s.seed is None else s.seed)
        pool["hessian"] = [pm.hessian_top_eigenvalue(hessian_loss_fn, params, iters=s.hessian_iters, generator=gen)]

    out.update(aggregate([pool]))
    return out, snapshot, pool


def aggregate(pools: list[Mapping[str, Any]]) -> dict[str, float]:
    """Module-level / overall summaries from the per-layer pools (rules in the module docstring)."""
    units = [u for p in pools for u in p.get("units", [])]
    res: dict[str, float] = {}
    if units:
        total = sum(u[2] for u in units)
        res["dormant_ratio"] = sum(u[0] for u in units) / total
        res["dead_ratio"] = sum(u[1] for u in units) / total
    layer_vals: dict[str, list[float]] = {}
    for p in pools:
        for k, vals in p.get("layer", {}).items():
            layer_vals.setdefault(k, []).extend(vals)
    for k, vals in layer_vals.items():
        if k == "weight_norm_sq":
            res["weight_norm"] = sum(vals) ** 0.5
        elif k == "grad_l2_sq":
            res["grad_l2"] = sum(vals) ** 0.5
        elif k == "grad_l1_sum":
            res["grad_l1"] = sum(vals)
        elif vals:
            res[k] = sum(vals) / len(vals)
    drift_sq = [d for p in pools for d in p.get("param_drift_sq", [])]
    if drift_sq:
        res["parameter_drift"] = sum(drift_sq) ** 0.5
    hessian = [h for p in pools for h in p.get("hessian", [])]
    if hessian:
        res["hessian_top_eigenvalue"] = max(hessian)
    return res


# ---------------------------------------------------------------------------------------------------
# RLlib: learner side


def _optimizer_info(learner: Any, module_id: str) -> dict[int, tuple[float, str]]:
    info: dict[int, tuple[float, str]] = {}
    try:
        optimizers = learner.get_optimizers_for_module(module_id)
    except (KeyError, AttributeError):
        return info
    for _, optim in optimizers:
        kind = "adam" if isinstance(optim, _ADAM_TYPES) else "sgd" if isinstance(optim, torch.optim.SGD) else None
        if kind is None:
            continue
        for group in optim.param_groups:
            for p in group["params"]:
                info[id(p)] = (float(group["lr"]), kind)
    return info


def _probe_forward(module: Any, obs: Tensor) -> Callable[[], object]:
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI

    def run():
        batch = {Columns.OBS: obs}
        custom = getattr(module, "plasticity_probe_forward", None)
        if callable(custom):
            return custom(batch)
        out = module.forward_inference(batch)
        if isinstance(module, ValueFunctionAPI):
            module.compute_values(batch)
        return out

    return run


def record_last_batch(learner: Any) -> None:
    """Wrap ``learner.compute_losses`` (this instance) to keep a reference to the last minibatch,
    the batch of :func:`learner_probe_loss`. Idempotent."""
    if getattr(learner, "_plasticity_records_batch", False):
        return
    orig = learner.compute_losses

    def compute_losses(*, fwd_out, batch, **kwargs):
        learner._plasticity_last_batch = batch
        return orig(fwd_out=fwd_out, batch=batch, **kwargs)

    learner.compute_losses = compute_losses
    learner._plasticity_records_batch = True


def learner_probe_loss(learner: Any, module_id: str) -> Callable[[], Tensor] | None:
    """A closure evaluating the learner's loss for ``module_id`` on a fixed batch, or None.

    ``learner.plasticity_probe_loss(module_id)`` (a learner-provided hook) wins; else RLlib's
    ``compute_loss_for_module`` on the last recorded minibatch (see :func:`record_last_batch`).
    """
    custom = getattr(learner, "plasticity_probe_loss", None)
    if callable(custom):
        return lambda: custom(module_id)
    batch = getattr(learner, "_plasticity_last_batch", None)
    if not batch or module_id not in batch:
        return None
    from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

    module = learner.module[module_id]
    mb = batch[module_id]
    config = learner.config.get_config_for_module(module_id)

    def loss() -> Tensor:
        saved = learner.metrics
        learner.metrics = MetricsLogger()  # the probe loss must not enter training statistics
        try:
            fwd = module.forward_train(mb)
            return learner.compute_loss_for_module(module_id=module_id, config=config, batch=mb, fwd_out=fwd)
        finally:
            learner.metrics = saved

    return loss


def learner_plasticity_metrics(learner: Any, *, probe_obs: Any, settings: dict) -> dict[str, float]:
    """Runs inside a Learner (via ``foreach_learner``): metrics of every torch module it trains.

    Returns {"<module_id>/<layer>/<metric>", "<module_id>/<metric>", "<metric>": value}. This is also
    the learner-side entry point for learners of our own algorithms that want to report the metrics
    themselves. Per-learner drift snapshots are kept on the learner instance.
    """
    s = PlasticitySettings(**settings)
    previous: dict = getattr(learner, "_plasticity_previous", {})
    warned: set = learner.__dict__.setdefault("_plasticity_warned", set())
    out: dict[str, float] = {}
    pools = []
    snapshots = {}
    for module_id in list(learner.module.keys()):
        rl_module = learner.module[module_id]
        module = rl_module.unwrapped() if hasattr(rl_module, "unwrapped") else rl_module
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters()):
            continue
        forward_fn = None
        if probe_obs is not None and s.activations:
            device = next(module.parameters()).device
            forward_fn = _probe_forward(module, torch.as_tensor(probe_obs, device=device))
        hessian_fn = learner_probe_loss(learner, module_id) if s.hessian else None
        with _single_thread():
            m, snap, pool = module_plasticity_metrics(
                module, forward_fn, s, previous=previous.get(module_id),
                optimizer_info=_optimizer_info(learner, module_id), hessian_loss_fn=hessian_fn,
            )
        if "forward_error" in pool and module_id not in warned:
            warned.add(module_id)
            logger.warning("plasticity: probe forward failed for module %r (%s); activation metrics "
                           "unavailable", module_id, pool["forward_error"])
        snapshots[module_id] = snap
        pools.append(pool)
        out.update({_key(module_id, k): v for k, v in m.items()})
    if s.drift:
        learner._plasticity_previous = snapshots
    out.update(aggregate(pools))
    return out


# ---------------------------------------------------------------------------------------------------
# RLlib: callback


def _rllib_callback_base() -> type:
    from ray.rllib.callbacks.callbacks import RLlibCallback

    return RLlibCallback


class _PlasticityCallbackMixin:
    """Callback body; :func:`make_plasticity_callback` binds settings into an RLlibCallback class."""

    settings: PlasticitySettings = PlasticitySettings()

    def on_algorithm_init(self, *, algorithm: Any, **kwargs: Any) -> None:
        install_probe_persistence(algorithm)
        if self.settings.hessian:
            algorithm.learner_group.foreach_learner(record_last_batch)

    def on_train_result(self, *, algorithm: Any, result: dict, **kwargs: Any) -> None:
        iteration = int(result.get("training_iteration", algorithm.iteration))
        if iteration % self.settings.every != 0:
            return
        t0 = time.perf_counter()
        result.update(compute_algorithm_plasticity(algorithm, self.settings))
        result[_key(PREFIX, "compute_s")] = time.perf_counter() - t0


def compute_algorithm_plasticity(algorithm: Any, settings: PlasticitySettings) -> dict[str, float]:
    """``plasticity/...`` metrics of an RLlib Algorithm's learner modules on the trial's probe set."""
    probe_obs = None
    if settings.activations:
        try:
            probe_obs = probe_set_for_algorithm(algorithm, settings.probe_size, settings.seed).obs.numpy()
        except Exception as e:  # noqa: BLE001 - env cannot give a probe: report weight metrics only
            if not getattr(algorithm, "_plasticity_probe_warned", False):
                algorithm._plasticity_probe_warned = True
                logger.warning("plasticity: no probe set (%s); activation metrics unavailable", e)
    results = algorithm.learner_group.foreach_learner(
        learner_plasticity_metrics, probe_obs=probe_obs, settings=settings.model_dump()
    )
    first = None
    for r in results:
        if not r.ok:
            raise r.get()
        first = r.get()
        break
    return {_key(PREFIX, k): float(v) for k, v in (first or {}).items()}


def make_plasticity_callback(settings: PlasticitySettings | Mapping[str, Any] | None = None) -> type:
    """An RLlibCallback subclass reporting ``plasticity/...`` with these settings (registry factory)."""
    if not isinstance(settings, PlasticitySettings):
        settings = PlasticitySettings(**(settings or {}))
    return type("PlasticityCallback", (_PlasticityCallbackMixin, _rllib_callback_base()), {"settings": settings})


# ---------------------------------------------------------------------------------------------------
# Tasks


class PlasticityHook:
    """Task hook: every K iterations, metrics of ``task.modules()`` on ``task.probe_inputs(n)``.

    The probe inputs are fetched once and kept in :meth:`state_dict` (so a resumed trial uses the same
    inputs). Each module is run as ``module(probe)``; modules that fail on the probe get weight and
    gradient metrics only. Tasks expose no loss or optimiser here, so effective_lr and
    hessian_top_eigenvalue are not reported for tasks.
    """

    def __init__(self, settings: PlasticitySettings | Mapping[str, Any] | None = None):
        if not isinstance(settings, PlasticitySettings):
            settings = PlasticitySettings(**(settings or {}))
        self.settings = settings
        self.probe: ProbeSet | None = None
        self._previous: dict[str, Any] = {}

    def _probe(self, task: Any) -> ProbeSet | None:
        if self.probe is None:
            try:
                inputs = task.probe_inputs(self.settings.probe_size)
            except NotImplementedError:
                return None
            self.probe = ProbeSet(torch.as_tensor(inputs), seed=int(getattr(task, "seed", 0) or 0),
                                  source=f"task:{type(task).__name__}")
        return self.probe

    def on_iteration(self, task: Any, iteration: int) -> dict[str, float]:
        if iteration % self.settings.every != 0:
            return {}
        t0 = time.perf_counter()
        probe = self._probe(task) if self.settings.activations else None
        out: dict[str, float] = {}
        pools = []
        for name, module in task.modules().items():
            if not isinstance(module, nn.Module):
                continue
            forward_fn = None
            if probe is not None:
                try:
                    device = next(module.parameters()).device
                except StopIteration:
                    device = torch.device("cpu")
                x = probe.obs.to(device)
                forward_fn = lambda m=module, x=x: m(x)  # noqa: E731
            with _single_thread():
                m, snap, pool = module_plasticity_metrics(
                    module, forward_fn, self.settings.model_copy(update={"hessian": False}),
                    previous=self._previous.get(name),
                )
            if "forward_error" in pool:
                logger.warning("plasticity: module %r failed on the probe inputs (%s); activation metrics "
                               "unavailable", name, pool["forward_error"])
            self._previous[name] = snap
            pools.append(pool)
            out.update({_key(PREFIX, name, k): v for k, v in m.items()})
        out.update({_key(PREFIX, k): v for k, v in aggregate(pools).items()})
        out[_key(PREFIX, "compute_s")] = time.perf_counter() - t0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"probe": self.probe.state_dict() if self.probe is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe = ProbeSet.from_state_dict(state["probe"]) if state.get("probe") is not None else None
        self._previous = {}


register_diagnostic(
    "plasticity",
    PlasticitySettings,
    rllib_callback=make_plasticity_callback,
    task_hook=PlasticityHook,
)
