"""Tune trainables: RLlib algorithms wrapped for specs, and non-RL tasks.

RLlib algorithms
    ``trainable_for_algorithm(name)`` returns a subclass of the algorithm (``orchestration.trainables.PPO``
    for RLlib's PPO) that accepts a spec trial config: flat AlgorithmConfig keys, project config blocks
    (``network`` ...), ``seed`` and the private ``_orchestra`` block (diagnostics, imports, cpus). It
    builds the AlgorithmConfig inside the trial, after Tune sampled the search space, and adds the
    project's result keys (``env/``, ``eval/``, ``learner/``, ``system/``, ``steps``) to each result.
    The subclass is importable by name through this module's ``__getattr__``, so checkpoints restore
    with ``Algorithm.from_checkpoint`` in any process.

Tasks
    ``trainable_for_task(name)`` returns a ``tune.Trainable`` running an ``algorithms.tasks.base.Task``,
    with checkpoints (task state + diagnostics hook state) and diagnostics hooks.

Checkpoints of both kinds carry ``orchestra_checkpoint.json`` (the Tune counters at the save and every file
with its size). Restoring from a checkpoint that no longer exists (Tune's experiment state can name one that
``checkpoint.keep`` pruning deleted after the state was written, when the driver is killed in between) falls
back to the newest complete checkpoint of the same trial, with a warning (:func:`existing_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from ray import tune

from orchestration.env import set_torch_threads
from orchestration.spec import (
    ORCHESTRA_KEY,
    algorithm_config_keys,
    import_user_modules,
    set_algorithm_config_value,
)

_CACHE: dict[str, type] = {}
STEPS_KEY = "steps"
CHECKPOINT_INFO = "orchestra_checkpoint.json"
logger = logging.getLogger(__name__)


def write_checkpoint_info(trainable: Any, checkpoint_dir: str) -> None:
    """``orchestra_checkpoint.json`` in ``checkpoint_dir``, written last: Tune's counters at this save
    (``training_iteration``, ``time_total_s``, ``timesteps_total``, ``episodes_total``: what Trainable.restore
    reads from a checkpoint's metrics) and {relative path: size} of every other file, so a later reader can
    tell a complete checkpoint from one cut short."""
    root = Path(checkpoint_dir)
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != CHECKPOINT_INFO}
    from algorithms.ray_compat import trainable_counters

    info = {**trainable_counters(trainable), "files": files}
    (root / CHECKPOINT_INFO).write_text(json.dumps(info))


def complete_checkpoint_metrics(path: Path) -> dict[str, Any] | None:
    """The counters of the checkpoint folder ``path`` if its ``orchestra_checkpoint.json`` exists and every file
    it lists is there with its recorded size, else None."""
    try:
        info = json.loads((path / CHECKPOINT_INFO).read_text())
        files = info.pop("files")
        if any((path / rel).stat().st_size != size for rel, size in files.items()):
            return None
    except (OSError, ValueError, KeyError):
        return None
    return {k: v for k, v in info.items() if v is not None}


def existing_checkpoint(checkpoint_result: Any) -> Any:
    """``checkpoint_result`` (a Tune ``_TrainingResult``) if its checkpoint exists, or the trial's newest
    complete checkpoint (:func:`complete_checkpoint_metrics`) when it was deleted; raises ValueError naming
    both when there is none. Only for checkpoints on the local filesystem (others pass through)."""
    from algorithms.ray_compat import training_result

    checkpoint = getattr(checkpoint_result, "checkpoint", None)
    if checkpoint is None or checkpoint.filesystem.type_name != "local" or Path(checkpoint.path).exists():
        return checkpoint_result
    missing = Path(checkpoint.path)
    for candidate in sorted(missing.parent.glob("checkpoint_*"), reverse=True):
        metrics = complete_checkpoint_metrics(candidate)
        if metrics is not None:
            logger.warning("checkpoint %s no longer exists (pruned after the experiment state was saved); "
                           "restoring from %s (training_iteration %s) instead", missing, candidate.name,
                           metrics.get("training_iteration"))
            return training_result(tune.Checkpoint(str(candidate), filesystem=checkpoint.filesystem),
                                   {**metrics, "checkpoint_dir_name": candidate.name})
    raise ValueError(f"checkpoint {missing} no longer exists and {missing.parent} has no complete checkpoint "
                     f"(a checkpoint_* folder with {CHECKPOINT_INFO} and all the files it lists) to restore from")


class CheckpointFallbackMixin:
    """Trainable mixin: writes :data:`CHECKPOINT_INFO` with every checkpoint and restores through
    :func:`existing_checkpoint`."""

    def save_checkpoint(self, checkpoint_dir: str) -> Any:
        out = super().save_checkpoint(checkpoint_dir)  # type: ignore[misc]
        write_checkpoint_info(self, checkpoint_dir)
        return out

    def restore(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        return super().restore(existing_checkpoint(checkpoint_path), *args, **kwargs)  # type: ignore[misc]


class NonFiniteLossError(RuntimeError):
    """A learner loss became NaN or infinite: the trial stops with this error."""


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _private(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config.get(ORCHESTRA_KEY) or {})


def _prepare_process(orch: dict[str, Any]) -> None:
    """Imports and threads for this trial process."""
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    import_user_modules(list(orch.get("imports") or []))
    set_torch_threads(orch.get("num_cpus") or 1)


def _diagnostic_objects(orch: dict[str, Any], kind: str) -> list[Any]:
    from algorithms import registry as R
    from algorithms.diagnostics import registry as D

    R.load_builtin_plugins()
    out = []
    for name, settings in (orch.get("diagnostics") or {}).items():
        diag = D.get_diagnostic(name)
        validated = diag.settings.model_validate(settings or {})
        factory = diag.rllib_callback if kind == "rllib" else diag.task_hook
        if factory is None:
            raise ValueError(f"diagnostic {name!r} does not support {kind}")
        out.append(factory(validated))
    return out


def _finite_or_raise(metrics: dict[str, Any], keys: list[str], iteration: int) -> None:
    for k in keys:
        v = metrics.get(k)
        if isinstance(v, int | float) and not math.isfinite(v):
            raise NonFiniteLossError(f"{k} is {v} at training iteration {iteration}: trial stopped")


def _scalars(tree: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Numeric leaves of a nested dict as a nested dict, dropping keys containing any of ``skip``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if any(s in k for s in skip):
            continue
        if isinstance(v, dict):
            sub = _scalars(v, skip)
            if sub:
                out[k] = sub
        elif isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, int | float) or type(v).__module__ == "numpy":
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


_NOISY = ("connector", "timer", "throughput", "weights_seq_no")


def project_result_keys(result: dict[str, Any]) -> dict[str, Any]:
    """RLlib result -> the project's groups (``env``, ``eval``, ``learner``, ``system``) and ``steps``.

    ``env_runners/X`` -> ``env/X``; ``evaluation/env_runners/X`` -> ``eval/X``;
    ``learners/<module>/X`` -> ``learner/X`` for a single module, ``learner/<module>/X`` otherwise.
    Connector timers and throughput internals are left out (they stay in the raw result).
    ``system/env_steps_per_s`` = env steps sampled this iteration / iteration wall time.
    """
    out: dict[str, Any] = {}
    env = _scalars(result.get("env_runners") or {}, _NOISY)
    if env:
        out["env"] = env
    ev = (result.get("evaluation") or {}).get("env_runners") or {}
    ev = _scalars(ev, _NOISY)
    if ev:
        out["eval"] = ev
    learners = {k: v for k, v in (result.get("learners") or {}).items() if isinstance(v, dict)}
    modules = {k: v for k, v in learners.items() if k != "__all_modules__"}
    learner: dict[str, Any] = {}
    if len(modules) == 1:
        learner = _scalars(next(iter(modules.values())), _NOISY)
    else:
        learner = {m: _scalars(v, _NOISY) for m, v in modules.items()}
    allm = learners.get("__all_modules__") or {}
    for k in ("num_env_steps_trained_lifetime", "num_env_steps_trained"):
        if isinstance(allm.get(k), int | float):
            learner[k] = float(allm[k])
    if learner:
        out["learner"] = learner
    steps = result.get("num_env_steps_sampled_lifetime")
    if steps is None:
        steps = (result.get("env_runners") or {}).get("num_env_steps_sampled_lifetime", 0)
    out[STEPS_KEY] = int(steps or 0)
    dt = result.get("time_this_iter_s") or 0.0
    system = {"iteration_time_s": float(dt), "training_iteration": float(result.get("training_iteration") or 0)}
    sampled = (result.get("env_runners") or {}).get("num_env_steps_sampled")
    if dt and isinstance(sampled, int | float):
        system["env_steps_per_s"] = float(sampled) / dt
    out["system"] = system
    return out


# ----------------------------------------------------------------------------------------------
# RLlib algorithms
# ----------------------------------------------------------------------------------------------
def build_algorithm_config(algo_cls: type, trial_config: dict[str, Any]) -> Any:
    """A trial's resolved config dict -> the algorithm's AlgorithmConfig (blocks, diagnostics, seed)."""
    from algorithms import registry as R

    config = dict(trial_config)
    orch = _private(config)
    config.pop(ORCHESTRA_KEY, None)
    _prepare_process(orch)
    R.load_builtin_plugins()

    cfg = algo_cls.get_default_config()
    env = config.pop("env", None)
    if env is not None:
        cfg.environment(env=env)
    seed = config.pop("seed", None)
    if isinstance(seed, list | tuple):  # a pack (spec `pack_seeds`): the replicas' seeds, the first is `seed`
        if not hasattr(cfg, "replica_seeds"):
            raise ValueError(f"{algo_cls.__name__} cannot train a pack of seeds {list(seed)}")
        cfg.debugging(seed=int(seed[0]))
        cfg.replica_seeds = [int(s) for s in seed]
    elif seed is not None:
        cfg.debugging(seed=int(seed))

    blocks = R.config_blocks()
    keys = algorithm_config_keys(algo_cls)
    deferred = []
    for key, value in config.items():
        if key in blocks:
            block = blocks[key].model.model_validate(value)
            if hasattr(cfg, key):
                setattr(cfg, key, block)
            else:
                deferred.append((blocks[key], block))
        else:
            set_algorithm_config_value(cfg, keys, key, value)
    for block_def, block in deferred:
        block_def.apply(cfg, block)

    diag_callbacks = _diagnostic_objects(orch, "rllib")
    if diag_callbacks:
        existing = cfg.callbacks_class if isinstance(cfg.callbacks_class, list) else [cfg.callbacks_class]
        from ray.rllib.callbacks.callbacks import RLlibCallback

        existing = [c for c in existing if c is not RLlibCallback]
        cfg.callbacks(callbacks_class=existing + diag_callbacks)
    if orch.get("checkpoint_replay") and hasattr(cfg, "checkpoint_replay"):
        cfg.checkpoint_replay = True
    return cfg


class OrchestraAlgorithmMixin(CheckpointFallbackMixin):
    """Mixed in front of an RLlib Algorithm class: spec trial configs in, project result keys out."""

    def __init__(self, config: Any = None, env: Any = None, **kwargs: Any):
        if isinstance(config, dict) and ORCHESTRA_KEY in config:
            config = build_algorithm_config(self._orchestra_base, config)
        super().__init__(config=config, env=env, **kwargs)

    def step(self) -> dict[str, Any]:
        result = super().step()
        extra = project_result_keys(result)
        # Algorithm.step() results have no training_iteration yet (Trainable.train() adds it after step
        # returns): this step is iteration self.iteration + 1.
        if not result.get("training_iteration"):
            extra.setdefault("system", {})["training_iteration"] = float(self.iteration + 1)
        learner = extra.get("learner", {})
        losses = {f"learner/{k}": v for k, v in learner.items() if isinstance(v, float) and "loss" in k}
        _finite_or_raise(losses, list(losses), result.get("training_iteration", 0) or self.iteration + 1)
        for group, values in extra.items():
            if isinstance(values, dict) and isinstance(result.get(group), dict):
                result[group].update(values)
            else:
                result[group] = values
        if isinstance(result.get(REPLICAS_KEY), dict):
            result[REPLICAS_KEY] = {seed: replica_result(rep, result) for seed, rep in result[REPLICAS_KEY].items()}
        return result


REPLICAS_KEY = "replicas"
"""Result key of a packed trial's per-replica results ({seed: result}, algorithms.offpolicy.packing)."""
FAILED_KEY = "failed"


def replica_result(rep: dict[str, Any], pack: dict[str, Any]) -> dict[str, Any]:
    """One replica's result of a packed trial in an unpacked trial's shape: its own groups through
    :func:`project_result_keys` plus its other groups (``uncertainty``); the iteration counters Tune adds
    (``training_iteration``, ``time_this_iter_s``) are the pack's, and the tracking callback reads them from
    the pack's result. ``{"failed": reason}`` passes through."""
    if FAILED_KEY in rep:
        return {FAILED_KEY: str(rep[FAILED_KEY])}
    out = {k: v for k, v in rep.items() if k not in ("env_runners", "learners") and isinstance(v, dict)}
    projected = project_result_keys(rep)
    projected["system"] = {"training_iteration": float((pack.get("system") or {}).get("training_iteration") or 0)}
    for group, values in projected.items():
        if isinstance(values, dict) and isinstance(out.get(group), dict):
            out[group] = {**out[group], **values}
        else:
            out[group] = values
    return out


def make_gym_env(env_id: str, imports: tuple[str, ...], env_config: Any = None) -> Any:
    """Env creator registered with Tune for spec envs: imports user modules first, then gym.make.

    Env runners are separate processes; importing there makes envs registered by the spec's
    ``imports`` (and the project's ``dmc/``, ``bsuite/``, ``minatar/`` ids) available in them.
    """
    import gymnasium as gym

    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    import_user_modules(list(imports))
    kwargs = dict(env_config or {})
    return gym.make(env_id, **kwargs)


def _encode(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", lambda m: f"_x{ord(m.group()):02x}_", name)


def _decode(name: str) -> str:
    return re.sub(r"_x([0-9a-f]{2})_", lambda m: chr(int(m.group(1), 16)), name)


def trainable_for_algorithm(name: str) -> type:
    """The spec-aware subclass of algorithm ``name`` (cached; importable from this module)."""
    from algorithms import registry as R

    attr = _encode(name)
    if attr not in _CACHE:
        R.load_builtin_plugins()
        base = R.get_algorithm_class(name)
        cls = type(attr, (OrchestraAlgorithmMixin, base), {"_orchestra_base": base, "__module__": __name__})
        cls.__qualname__ = attr
        _CACHE[attr] = cls
    return _CACHE[attr]


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------
class TaskTrainable(CheckpointFallbackMixin, tune.Trainable):
    """Runs a registered Task: one Tune iteration = one ``task.train()`` call (its own ``save_checkpoint``
    writes the checkpoint info itself)."""

    _task_name: str = ""

    def setup(self, config: dict[str, Any]) -> None:
        import torch

        from algorithms import registry as R

        config = dict(config)
        orch = _private(config)
        config.pop(ORCHESTRA_KEY, None)
        _prepare_process(orch)
        R.load_builtin_plugins()
        task_cls = R.get_task_class(self._task_name)
        seed = int(config.pop("seed", 0))
        if "__trial_index__" in config:  # Repeater: seed by repetition index
            idx = int(config.pop("__trial_index__"))
            seeds = orch.get("seeds") or [seed]
            seed = int(seeds[idx % len(seeds)])
        torch.manual_seed(seed)
        task_config = task_cls.Config.model_validate(config)
        self.artifact_dir = Path(self.logdir) / "artifacts"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.task = task_cls(task_config, seed=seed, artifact_dir=self.artifact_dir)
        self.hooks = _diagnostic_objects(orch, "task")

    def step(self) -> dict[str, Any]:
        metrics = dict(self.task.train())
        for hook in self.hooks:
            metrics.update(hook.on_iteration(self.task, self.iteration + 1))
        loss_keys = [k for k in metrics if k.endswith("loss")]
        _finite_or_raise(metrics, loss_keys, self.iteration + 1)
        metrics[STEPS_KEY] = int(self.task.steps)
        metrics["system/training_iteration"] = float(self.iteration + 1)
        return metrics

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        import torch

        state = {"task": self.task.state_dict(), "hooks": [h.state_dict() for h in self.hooks]}
        torch.save(state, os.path.join(checkpoint_dir, "task.pt"))
        write_checkpoint_info(self, checkpoint_dir)
        # Returning None makes Tune hand the (persisted) checkpoint folder to load_checkpoint.

    def load_checkpoint(self, checkpoint: str) -> None:
        import torch

        state = torch.load(os.path.join(checkpoint, "task.pt"), weights_only=False)
        self.task.load_state_dict(state["task"])
        for hook, s in zip(self.hooks, state.get("hooks", [])):
            hook.load_state_dict(s)


def trainable_for_task(name: str) -> type:
    attr = _encode(name)
    if attr not in _CACHE:
        cls = type(attr, (TaskTrainable,), {"_task_name": name, "__module__": __name__})
        cls.__qualname__ = attr
        _CACHE[attr] = cls
    return _CACHE[attr]


def __getattr__(attr: str) -> type:
    """Resolve wrapped classes by name, so pickles and checkpoints find them in any process."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    imports = [m for m in os.environ.get("ORCHESTRA_IMPORTS", "").split(",") if m]
    if imports:
        import_user_modules(imports)
    from algorithms import registry as R

    R.load_builtin_plugins()
    name = _decode(attr)
    try:
        if name in R.registered_tasks():
            return trainable_for_task(name)
        return trainable_for_algorithm(name)
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}") from None

