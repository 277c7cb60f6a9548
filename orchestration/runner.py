"""Builds and runs the Tune experiment for a spec; resumes interrupted launches.

One *launch* = one ``orchestra run`` of a spec: a Tune experiment folder ``<storage>/<launch>``
(launch = ``<spec name>-<YYYYmmdd-HHMMSS>``), one MLflow parent run tagged with the launch id, one
child run per trial. ``orchestra_launch.json`` in the launch folder records what resume needs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestration import search as S
from orchestration.env import set_local_ray_env
from orchestration.spec import ORCHESTRA_KEY, Spec, SpecError, load_spec, param_space_key

LAUNCH_FILE = "orchestra_launch.json"


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------
def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    imports: list[str] | tuple[str, ...] = (),
    extra_pythonpath: list[str] | tuple[str, ...] = (),
    log_to_driver: bool = True,
) -> None:
    """Start an embedded Ray on 127.0.0.1 (default) or join ``address``; no-op if Ray is up.

    Every worker of the job imports ``imports`` (and the project's envs) at start through a
    worker-process setup hook, and gets the driver's working directory on its PYTHONPATH.
    ``log_to_driver=False`` keeps the workers' stdout/stderr off the driver's console (an embedded
    Ray only; a joined cluster always streams them): trials write theirs to their trial folder.
    """
    set_local_ray_env()
    import ray

    if ray.is_initialized():
        return
    paths = [os.getcwd(), *extra_pythonpath]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    runtime_env = {
        "worker_process_setup_hook": "orchestration.worker.setup",
        "env_vars": {"ORCHESTRA_IMPORTS": ",".join(imports), "PYTHONPATH": os.pathsep.join(paths)},
    }
    os.environ["ORCHESTRA_IMPORTS"] = ",".join(imports)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            # "local" always starts a new embedded cluster; a bare init() would join any Ray it finds
            # running on the machine (ray_current_cluster file, gcs_server processes).
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
        )


# ----------------------------------------------------------------------------------------------
# Spec -> Tune objects
# ----------------------------------------------------------------------------------------------
def resolve_paths(spec: Spec, base: Path | None = None) -> Spec:
    """Make tracking URI (sqlite), artifact location and storage absolute, relative to ``base``
    (``~`` is the home of the process that runs the launch, e.g. the head's for a launched job)."""
    base = (base or Path.cwd()).resolve()
    t = spec.tracking
    server_default_artifacts = artifact_location(spec) is None  # assigning t.artifacts would mark it set
    t.storage = os.path.expanduser(t.storage)
    if not server_default_artifacts:
        t.artifacts = os.path.expanduser(t.artifacts)
    if t.uri.startswith("sqlite:///") and not t.uri.startswith("sqlite:////"):
        db = base / t.uri[len("sqlite:///"):]
        db.parent.mkdir(parents=True, exist_ok=True)
        t.uri = f"sqlite:///{db}"
    elif "://" not in t.uri:
        t.uri = str((base / t.uri).resolve())
    if "://" not in t.artifacts and not server_default_artifacts:
        t.artifacts = str((base / t.artifacts).resolve())
    if "://" not in t.storage:
        t.storage = str((base / t.storage).resolve())
    if t.credentials_file:
        t.credentials_file = str((base / os.path.expanduser(t.credentials_file)).resolve())
    return spec


def artifact_location(spec: Spec) -> str | None:
    """Where a new experiment keeps its artifacts: ``tracking.artifacts``, except on a tracking server when
    the spec does not set it: None, the server's own location, so artifacts go through the server
    (``orchestra server`` proxies them) and clients need no storage access of their own."""
    from orchestration.tracking.access import is_server_uri

    t = spec.tracking
    return None if is_server_uri(t.uri) and "artifacts" not in t.model_fields_set else t.artifacts


def check_tracking(spec: Spec, launch_name: str) -> None:
    """Before any trial: the spec's credentials in the driver's environment (where the tracking callback
    sends from) and, on a tracking server, those credentials accepted and the experiment writable; else
    one UserError (orchestration.tracking.access)."""
    from orchestration.tracking.access import apply_credentials_file, check_experiment_write, is_server_uri

    t = spec.tracking
    if not t.enabled:
        return
    apply_credentials_file(t.credentials_file)
    if is_server_uri(t.uri):
        check_experiment_write(t.uri, spec.experiment_name, artifact_location(spec), launch_name)


def trial_cpus(spec: Spec) -> float:
    if spec.resources is not None:
        return spec.resources.cpus
    if spec.is_task:
        return 1
    return float(spec.config.get("num_cpus_for_main_process", 1) or 1)


def seed_packs(spec: Spec) -> list[list[int]]:
    """The spec's seeds in packs of ``pack_seeds``, in order: one trial per pack (the spec checker made
    ``len(seeds)`` a multiple of it)."""
    k = spec.pack_seeds
    return [list(spec.seeds[i : i + k]) for i in range(0, len(spec.seeds), k)]


def build_param_space(spec: Spec) -> dict[str, Any]:
    """The trial config: spec config (markers -> Tune domains), seed, env and the private block."""
    from ray import tune

    space = S.to_tune(spec.config)
    repeat_seeds = spec.search is not None and spec.search.type == "optuna"
    packs = seed_packs(spec)
    if spec.pack_seeds > 1:  # a trial's `seed` is its pack, the list of its replicas' seeds
        space["seed"] = packs[0] if len(packs) == 1 else tune.grid_search(packs)
    elif len(spec.seeds) == 1 or repeat_seeds:
        space["seed"] = spec.seeds[0]
    else:
        space["seed"] = tune.grid_search(list(spec.seeds))
    if not spec.is_task:
        from algorithms import registry as R

        R.load_builtin_plugins()
        default = R.get_algorithm_class(spec.algorithm).get_default_config()
        space = {param_space_key(default, k): v for k, v in space.items()}
        space["env"] = S.to_tune(spec.env)
    space[ORCHESTRA_KEY] = {
        "workload": spec.workload,
        "diagnostics": spec.diagnostics,
        "imports": list(spec.imports),
        "num_cpus": trial_cpus(spec),
        "seeds": list(spec.seeds),
        "checkpoint_replay": spec.checkpoint.replay,
    }
    return space


def build_trainable(spec: Spec) -> Any:
    from ray import tune

    from orchestration.trainables import trainable_for_algorithm, trainable_for_task

    trainable = trainable_for_task(spec.workload) if spec.is_task else trainable_for_algorithm(spec.algorithm)
    r = spec.resources
    if r is None and spec.is_task:
        r = type(spec).model_fields["resources"].annotation.__args__[0]()  # ResourcesSpec defaults
    if r is not None:
        head = {"CPU": r.cpus, "GPU": r.gpus, **r.custom}
        head = {k: v for k, v in head.items() if v}
        bundles = [head or {"CPU": 0.01}, *[dict(b) for b in r.bundles]]
        trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles, strategy=r.strategy))
    return trainable


def register_spec_env(spec: Spec) -> None:
    """Register the spec's env with Tune's registry through an importing creator (see make_gym_env)."""
    if spec.is_task or spec.env is None:
        return
    import functools

    import gymnasium as gym
    from ray.tune.registry import register_env

    from algorithms.ray_compat import registered_env_creator
    from orchestration.trainables import make_gym_env

    for env in spec.env_ids:
        if env in gym.registry and registered_env_creator(env) is None:
            register_env(env, functools.partial(make_gym_env, env, tuple(spec.imports)))


def _git_commit(cwd: Path) -> str:
    """HEAD's sha (``-dirty`` with uncommitted changes); ``ORCHESTRA_GIT_COMMIT`` if set (a launched
    job runs in a copy without .git: `orchestra launch` records the commit and passes it)."""
    if os.environ.get("ORCHESTRA_GIT_COMMIT"):
        return os.environ["ORCHESTRA_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out


@dataclass
class Launch:
    """What a launch records (``orchestra_launch.json``) and what resume needs."""

    name: str
    spec: dict[str, Any]
    spec_file: str | None
    overrides: list[str]
    git_commit: str
    command: str
    started: float
    address: str | None = None
    resumes: list[float] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.spec["tracking"]["storage"]) / self.name

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / LAUNCH_FILE).write_text(json.dumps(self.__dict__, indent=2, default=str))

    @classmethod
    def load(cls, path: Path) -> Launch:
        return cls(**json.loads((path / LAUNCH_FILE).read_text()))


def _tracking_callback(spec: Spec, launch: Launch, resumed: bool) -> Any:
    from orchestration.tracking import MLflowTracking

    files = {}
    spec_yaml = launch.path / "spec.resolved.yaml"
    spec_yaml.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    files["spec.resolved.yaml"] = str(spec_yaml)
    if launch.spec_file and Path(launch.spec_file).exists():
        files["spec.yaml"] = str(Path(launch.spec_file).resolve())
    freeze = launch.path / "requirements.freeze.txt"
    if not freeze.exists():
        dists = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()},
                       key=str.lower)
        freeze.write_text("\n".join(dists) + "\n")
    files["pip-freeze.txt"] = str(freeze)
    import ray
    import torch

    tags = {
        "orchestra.spec_hash": spec.spec_hash(),
        "orchestra.git_commit": launch.git_commit,
        "orchestra.command": launch.command[:5000],
        "orchestra.spec_name": spec.name,
        "orchestra.launch": launch.name,
        "orchestra.ray_version": ray.__version__,
        "orchestra.torch_version": torch.__version__,
        "orchestra.algorithm": spec.workload,
        "orchestra.env" if not spec.is_task else "orchestra.task": spec.env_label or spec.workload,
    }
    if spec.metric:
        tags["orchestra.metric"] = spec.metric
        tags["orchestra.mode"] = spec.mode
    trial_tags = {k: tags[k] for k in ("orchestra.algorithm", "orchestra.spec_hash", "orchestra.git_commit",
                                       "orchestra.ray_version", "orchestra.torch_version", "orchestra.launch")}
    trial_tags["orchestra.env" if not spec.is_task else "orchestra.task"] = spec.env_label or spec.workload
    return MLflowTracking(
        spec.tracking.uri,
        spec.experiment_name,
        launch.name,
        artifact_location=artifact_location(spec),
        launch_tags=tags,
        launch_params=_flatten(spec.to_dict()),
        launch_artifacts=files,
        trial_tags=trial_tags,
        resumed=resumed,
    )


def display_metric(spec: Spec) -> str | None:
    """The metric the console and the summary show: the spec's, else an RL workload's episode return."""
    from orchestration.console import RL_METRIC

    return spec.metric or (None if spec.is_task else RL_METRIC)


def _run_config(spec: Spec, launch: Launch, resumed: bool) -> Any:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from orchestration.console import ConsoleCallback, TrialTable

    # Tune's auto loggers are off (TensorBoard files per trial cost time); keep result.json/progress.csv.
    callbacks: list[Any] = [JsonLoggerCallback(), CSVLoggerCallback()]
    if spec.tracking.enabled:
        callbacks.append(_tracking_callback(spec, launch, resumed))
    step_label = "steps" if spec.is_task else "env steps"
    console = ConsoleCallback(spec.stop, display_metric(spec), step_label)
    callbacks.append(console)
    c = spec.checkpoint
    return tune.RunConfig(
        name=launch.name,
        storage_path=spec.tracking.storage,
        stop=dict(spec.stop) or None,
        failure_config=tune.FailureConfig(max_failures=spec.failure.max_retries, fail_fast=spec.failure.fail_fast),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=c.keep, checkpoint_frequency=c.frequency, checkpoint_at_end=c.at_end
        ),
        callbacks=callbacks,
        # Our table (Tune's classic output engine: orchestration.console.library_output sets it) and
        # each trial's stdout/stderr in its folder (synced with the trial's checkpoints and at its end).
        progress_reporter=TrialTable(display_metric(spec), spec.mode, step_label, console),
        log_to_file=True,
        sync_config=tune.SyncConfig(sync_artifacts=True),
        verbose=1,
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class RunResult:
    launch: str
    path: Path
    tracking_uri: str
    experiment: str
    result_grid: Any = None
    num_errors: int = 0
    trials: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    metric: str | None = None
    mode: str = "max"
    tracking: bool = True
    driver_log: str | None = None

    MAX_CONFIGS = 10

    def best_per_configuration(self) -> list[tuple[str, dict[str, Any] | None, int]]:
        """(grid point as text, its best trial or None without a metric value, its number of trials), in
        the trials' order. A grid point = the trial's searched values without the seed."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for t in self.trials:
            point = {k: v for k, v in (t.get("params") or {}).items() if k != "seed"}
            label = " ".join(f"{k.rsplit('/', 1)[-1]}={v!r}" for k, v in point.items()) or "(one configuration)"
            groups.setdefault(label, []).append(t)
        sign = 1.0 if self.mode == "max" else -1.0
        out = []
        for label, ts in groups.items():
            valued = [t for t in ts if t.get("value") is not None]
            best = max(valued, key=lambda t: sign * t["value"]) if valued else None
            out.append((label, best, len(ts)))
        return out

    def summary(self) -> str:
        """The end-of-launch block: trials, best trial per grid point, errors, where everything is, what next."""
        from orchestration.console import error_summary, fmt, short_name

        statuses: dict[str, int] = {}
        for t in self.trials:
            statuses[t.get("status") or "?"] = statuses.get(t.get("status") or "?", 0) + 1
        states = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()) if s != "?")
        lines = [f"launch {self.launch}: {_plural(len(self.trials), 'trial')}" + (f" ({states})" if states else "")
                 + f", {_plural(self.num_errors, 'error')}"
                 + (f" -- INTERRUPTED: continue with `orchestra resume {self.launch}`" if self.interrupted else "")]
        if self.metric and self.trials:
            configs = self.best_per_configuration()
            lines.append(f"best trial per configuration (last {short_name(self.metric)}, {self.mode}):")
            ranked = sorted(configs, key=lambda c: -(1.0 if self.mode == "max" else -1.0) * c[1]["value"]
                            if c[1] else float("inf"))
            shown = configs if len(configs) <= self.MAX_CONFIGS else ranked[: self.MAX_CONFIGS]
            width = max(len(label) for label, _, _ in shown)
            for label, best, n in shown:
                if best is None:
                    lines.append(f"  {label.ljust(width)}  no {short_name(self.metric)} reported ({n} trials)")
                    continue
                seed = (best.get("params") or {}).get("seed", best.get("config", {}).get("seed"))
                lines.append(f"  {label.ljust(width)}  {fmt(best['value']):>8}  {best.get('name')}"
                             + (f" (seed {seed}" + (f", best of {n})" if n > 1 else ")") if seed is not None else ""))
            if len(configs) > len(shown):
                lines.append(f"  ... {len(configs) - len(shown)} more configurations")
        errors = [t for t in self.trials if t.get("error")]
        if errors:
            lines.append("errors:")
            for t in errors:
                lines.append(f"  {t.get('name')}: {error_summary(t['error'])}")
                lines.append(f"    log: {t.get('error_file') or t.get('path')}")
        lines.append(f"trial folders: {self.path}")
        if self.tracking:
            lines.append(f"MLflow: {self.tracking_uri} (experiment {self.experiment!r})")
        if self.driver_log:
            lines.append(f"library output: {self.driver_log} and each trial folder's stdout/stderr (--verbose prints it)")
        if self.tracking:
            from orchestration.spec import TrackingSpec

            default = f"sqlite:///{(Path.cwd() / TrackingSpec().uri[len('sqlite:///'):]).resolve()}"
            uri = "" if self.tracking_uri == default else f" --uri '{self.tracking_uri}'"
            lines.append(f"next: orchestra ui{uri}   |   orchestra report {self.experiment}{uri}"
                         f"   |   orchestra ls {self.experiment}{uri}")
        return "\n".join(lines)


def dry_run_text(spec: Spec) -> str:
    """What a launch would run: trials (grid values x seeds x num_samples), resources, stop rule."""
    variants = S.grid_variants(spec.config)
    randoms = [(p, m) for p, m in S.walk_markers(spec.config, "config") if "grid" not in m]
    n = len(variants) * len(spec.seeds) * spec.num_samples
    env_variants = S.grid_variants({"env": spec.env}) if isinstance(spec.env, dict) else [({}, None)]
    variants = [({**ea, **a}, v) for ea, _ in env_variants for a, v in variants]
    packs = seed_packs(spec)
    n = len(variants) * len(packs) * spec.num_samples
    seeds = (f"{len(packs)} pack(s) of {spec.pack_seeds} seeds" if spec.pack_seeds > 1
             else f"{len(spec.seeds)} seed(s)")
    lines = [f"spec {spec.name}: {spec.workload}" + (f" on {spec.env_label}" if spec.env else ""),
             f"{n} trials = {len(variants)} grid point(s) x {seeds} x {spec.num_samples} sample(s)"]
    for i, (assignment, _) in enumerate(variants):
        for seed in packs if spec.pack_seeds > 1 else spec.seeds:
            values = ", ".join(f"{k}={v!r}" for k, v in assignment.items())
            lines.append(f"  [{i}] seed={seed}" + (f" {values}" if values else ""))
    for p, m in randoms:
        lines.append(f"  sampled per trial: {p} ~ {S.describe(m)}")
    if spec.resources is not None:
        r = spec.resources
        lines.append(f"resources per trial: cpus={r.cpus} gpus={r.gpus} custom={r.custom} extra bundles={r.bundles}")
    elif spec.is_task:
        lines.append("resources per trial: cpus=1 gpus=0")
    else:
        lines.append("resources per trial: from the RLlib config (main process, env runners, learners)")
    lines.append(f"stop: {dict(spec.stop) or 'when the trainable finishes'}")
    if spec.scheduler:
        lines.append(f"scheduler: {spec.scheduler.type}")
    lines.append(f"metric: {spec.metric} ({spec.mode})" if spec.metric else "metric: none")
    lines.append(f"tracking: {spec.tracking.uri} (experiment {spec.experiment_name!r}); storage {spec.tracking.storage}")
    return "\n".join(lines)


def _collect(result_grid: Any, launch: Launch, spec: Spec, driver_log: Path | None = None) -> RunResult:
    from orchestration.console import result_value, trial_error_path

    metric = display_metric(spec)
    tune_trials = list(getattr(getattr(result_grid, "_experiment_analysis", None), "trials", None) or [])
    by_path = {str(t.path): t for t in tune_trials}
    trials = []
    errors = 0
    for r in result_grid:
        err = r.error
        errors += err is not None
        t = by_path.get(str(r.path))
        trials.append({"config": {k: v for k, v in (r.config or {}).items() if k != ORCHESTRA_KEY},
                       "metrics": {k: v for k, v in (r.metrics or {}).items() if not isinstance(v, dict)},
                       "error": str(err) if err else None, "path": r.path,
                       "name": str(t) if t is not None else Path(r.path).name,
                       "status": t.status if t is not None else None,
                       "params": dict(t.evaluated_params) if t is not None else {},
                       "value": result_value(r.metrics, metric) if metric else None,
                       "error_file": trial_error_path(t) if err and t is not None else None})
    statuses = [t.status for t in tune_trials]
    interrupted = any(st not in ("TERMINATED", "ERROR") for st in statuses)
    return RunResult(launch.name, launch.path, spec.tracking.uri, spec.experiment_name, result_grid, errors, trials,
                     interrupted, metric=metric, mode=spec.mode, tracking=spec.tracking.enabled,
                     driver_log=str(driver_log) if driver_log else None)


def run(
    spec_or_path: str | Path | dict[str, Any] | Spec,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    dry_run: bool = False,
    launch_name: str | None = None,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> RunResult | str:
    """Load, validate and run a spec; returns a :class:`RunResult` (or the dry-run text).

    ``verbose``: Ray's, RLlib's and the trials' log lines on the console too (else in log files)."""
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path, overrides)
    spec_file = getattr(spec, "_file", None)
    if dry_run:
        return dry_run_text(spec)
    resolve_paths(spec)
    name = launch_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    launch = Launch(name=name, spec=spec.to_dict(), spec_file=spec_file, overrides=list(overrides),
                    git_commit=_git_commit(Path(spec_file).parent if spec_file else Path.cwd()),
                    command=os.environ.get("ORCHESTRA_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv),
                    started=time.time(), address=address)
    if launch.path.exists() and (launch.path / LAUNCH_FILE).exists():
        raise SpecError(spec_file, "name", f"launch folder {launch.path} exists already; use `orchestra resume {name}`")
    check_tracking(spec, name)
    launch.save()
    return _fit(spec, launch, resumed=False, num_cpus=num_cpus, verbose=verbose)


def _fit(spec: Spec, launch: Launch, resumed: bool, num_cpus: int | None = None,
         verbose: bool = False) -> RunResult:
    from orchestration.console import library_output

    with library_output(launch.path, verbose=verbose, rllib=not spec.is_task) as driver_log:
        return _tune(spec, launch, resumed, num_cpus, verbose, driver_log)


def _tune(spec: Spec, launch: Launch, resumed: bool, num_cpus: int | None, verbose: bool,
          driver_log: Path | None) -> RunResult:
    from ray import tune

    init_ray(launch.address, num_cpus=num_cpus, imports=spec.imports,
             extra_pythonpath=[str(Path(launch.spec_file).parent.resolve())] if launch.spec_file else [],
             log_to_driver=verbose)
    from algorithms import registry as R

    R.load_builtin_plugins()
    from orchestration.spec import import_user_modules

    import_user_modules(spec.imports)
    register_spec_env(spec)
    trainable = build_trainable(spec)
    run_config = _run_config(spec, launch, resumed)
    # An RL trial reports env/episode_return_mean only once an episode has ended (a MinAtar freeway episode
    # of 2,500 steps outlasts a 2,000-step PPO iteration). Tune's schedulers and searchers skip results that
    # lack their metric, so its strict check would only fail such trials; a configuration whose trials never
    # report the metric shows "no <metric> reported" in the launch summary (RunResult.summary).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if resumed:
        tuner = tune.Tuner.restore(str(launch.path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False,
                                   param_space=build_param_space(spec))
        _replace_callbacks(tuner, run_config)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=build_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode if spec.metric else None,
                scheduler=S.build_scheduler(spec),
                search_alg=S.build_search_alg(spec, repeat=len(spec.seeds)),
                num_samples=spec.num_samples * (len(spec.seeds) if spec.search and spec.search.type == "optuna" else 1),
                max_concurrent_trials=spec.max_concurrent_trials if not (spec.search and spec.search.type == "optuna") else None,
            ),
            run_config=run_config,
        )
    result_grid = tuner.fit()
    return _collect(result_grid, launch, spec, driver_log)


def _replace_callbacks(tuner: Any, run_config: Any) -> None:
    """Tuner.restore unpickles the old run config; use fresh tracking and console callbacks (and the table
    that reads the console callback) in resume mode."""
    local = getattr(tuner, "_local_tuner", None)
    rc = getattr(local, "_run_config", None) if local is not None else None
    if rc is not None:
        rc.callbacks = run_config.callbacks
        rc.progress_reporter = run_config.progress_reporter
        rc.log_to_file = run_config.log_to_file
        rc.sync_config = run_config.sync_config


def find_launch(name: str, storage: str | Path = "runs") -> Path:
    """A launch folder by launch name, or the newest launch of a spec name."""
    root = Path(storage).resolve()
    p = Path(name)
    if p.is_dir() and (p / LAUNCH_FILE).exists():
        return p.resolve()
    if (root / name / LAUNCH_FILE).exists():
        return root / name
    candidates = sorted(
        (d for d in root.glob(f"{name}-*") if (d / LAUNCH_FILE).exists()), key=lambda d: d.stat().st_mtime
    )
    if not candidates:
        known = sorted(d.name for d in root.glob("*") if (d / LAUNCH_FILE).exists())
        raise SpecError(None, "name", f"no launch named {name!r} under {root}", allowed=known or "none yet")
    return candidates[-1]


def resume(name: str, *, storage: str | Path = "runs", address: str | None = None,
           num_cpus: int | None = None, verbose: bool = False) -> RunResult:
    """Continue an interrupted launch: unfinished trials from their last checkpoint; MLflow runs reused."""
    path = find_launch(name, storage)
    launch = Launch.load(path)
    spec = load_spec(launch.spec, check_names=True)
    spec._file = launch.spec_file  # type: ignore[attr-defined]
    if address:
        launch.address = address
    check_tracking(spec, launch.name)
    launch.resumes.append(time.time())
    launch.save()
    return _fit(spec, launch, resumed=True, num_cpus=num_cpus, verbose=verbose)
