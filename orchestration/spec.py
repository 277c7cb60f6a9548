"""Experiment specs: YAML -> validated :class:`Spec`, with errors that name file, key, value, allowed.

A spec (see experiments/README.md for the full reference)::

    name: quickstart
    algorithm: PPO                 # RLlib built-in, one of ours, a registered task, or "pkg.mod:Class"
    env: CartPole-v1               # a registered env (or `task: NAME` for non-RL workloads)
    config: {lr: {grid: [1.0e-4, 3.0e-4]}, train_batch_size_per_learner: 1000}
    seeds: [0, 1]
    stop: {training_iteration: 10}
    metric: env/episode_return_mean
    mode: max

Validation happens in two stages: the schema (pydantic) and the names (algorithm, env, task,
config keys, diagnostics), which need the spec's ``imports`` to be imported first.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib
import inspect
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from algorithms.settings import SettingError
from orchestration import search as S

# Keys of the orchestration-private block inside each trial's config.
ORCHESTRA_KEY = "_orchestra"


class UserError(ValueError):
    """A problem with what the user asked for (a file, a name, a URI, an option value), not a bug.

    The CLI prints it as one line ``error: <message>`` and exits 2, without a traceback; the message
    names what was wrong and what is allowed."""


class SpecError(UserError):
    """A spec problem: ``file: key: message (got value; allowed: ...)``."""

    def __init__(self, file: str | None, key: str, message: str, value: Any = ..., allowed: Any = None):
        self.file, self.key, self.message, self.value, self.allowed = file, key, message, value, allowed
        text = f"{file or '<spec>'}: {key or '<top>'}: {message}"
        if value is not ...:
            text += f" (got {value!r})"
        if allowed:
            if isinstance(allowed, list | tuple | set):
                allowed = ", ".join(str(a) for a in allowed)
            text += f"; allowed: {allowed}"
        super().__init__(text)


def yaml_error(file: str, err: yaml.YAMLError) -> SpecError:
    """A YAML syntax error as ``FILE:LINE:COLUMN: problem`` (1-based, as editors count), one line."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    context = getattr(err, "context", None) if getattr(err, "problem", None) else None
    where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else file
    text = f"{where}: {problem}"
    cmark = getattr(err, "context_mark", None)
    if context and cmark is not None and mark is not None and (cmark.line, cmark.column) != (mark.line, mark.column):
        text += f" ({context} at {cmark.line + 1}:{cmark.column + 1})"
    out = SpecError(file, "", "not valid YAML: " + problem)
    out.args = (" ".join(text.split()),)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointSpec(_Strict):
    frequency: int = Field(0, ge=0)
    """Checkpoint every N training iterations (0: only at the end)."""
    keep: int | None = Field(2, ge=1)
    """Keep the N most recent checkpoints per trial (None: all)."""
    at_end: bool = True
    """Write a checkpoint when a trial finishes."""
    replay: bool = False
    """Include the replay buffer in checkpoints (off-policy algorithms that support it)."""


class FailureSpec(_Strict):
    max_retries: int = Field(0, ge=-1)
    """Retry a failing trial up to N times from its last checkpoint (-1: forever)."""
    fail_fast: bool = False
    """Stop the whole launch at the first trial failure."""


class TrackingSpec(_Strict):
    uri: str = "sqlite:///mlruns/mlflow.db"
    """MLflow tracking URI (relative sqlite paths are resolved at launch)."""
    experiment: str | None = None
    """MLflow experiment name (default: the spec's name)."""
    artifacts: str = "mlruns/artifacts"
    """Artifact location for new experiments (relative paths are resolved at launch)."""
    storage: str = "runs"
    """Tune storage path for trial directories and checkpoints (local dir, or s3://...)."""
    enabled: bool = True
    """Log to MLflow at all."""
    credentials_file: str | None = None
    """INI file (the format of MLflow's ~/.mlflow/credentials) with the tracking server's username and
    password; else MLflow's MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (docs/clusters.md)."""


class ResourcesSpec(_Strict):
    cpus: float = Field(1, ge=0)
    """CPUs for the trial's own process (also its torch thread count)."""
    gpus: float = Field(0, ge=0)
    """GPUs for the trial's own process (fractions allowed)."""
    custom: dict[str, float] = {}
    """Custom Ray resources for the trial's own process, e.g. {node_type_a: 1}."""
    bundles: list[dict[str, float]] = []
    """Extra placement-group bundles for actors a trial starts, e.g. [{CPU: 1, GPU: 1}]."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement strategy for the trial's bundles."""


class SchedulerSpec(_Strict):
    type: Literal["fifo", "asha", "pbt"]
    time_attr: str = "training_iteration"
    # ASHA
    max_t: int = Field(100, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(4, gt=1)
    # PBT
    perturbation_interval: float = Field(5, gt=0)
    burn_in_period: float = Field(0, ge=0)
    mutations: dict[str, Any] | None = None
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    synch: bool = False


class SearchSpec(_Strict):
    type: Literal["basic", "grid", "random", "optuna"] = "basic"
    seed: int | None = None


class Spec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    """Experiment name: letters, digits, _ . - (MLflow experiment and run folder)."""
    description: str = ""
    algorithm: str | None = None
    env: str | dict[str, Any] | None = None
    """An env id, or a grid/choice marker over env ids (``{grid: [minatar/breakout, ...]}``)."""
    task: str | None = None
    config: dict[str, Any] = {}
    seeds: list[int] = [0]
    pack_seeds: int = Field(1, ge=1)
    """Train this many seeds as replicas of one Tune trial (docs/methods.md, "Seed packing"); 1: a trial
    per seed. ``len(seeds)`` must be a multiple of it; only algorithms declaring ``supports_pack_seeds``."""
    stop: dict[str, int | float] = {}
    metric: str | None = None
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec | None = None
    search: SearchSpec | None = None
    resources: ResourcesSpec | None = None
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    checkpoint: CheckpointSpec = CheckpointSpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    diagnostics: dict[str, dict[str, Any]] = {}
    imports: list[str] = []

    @field_validator("seeds")
    @classmethod
    def _seeds_nonempty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one seed")
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @field_validator("diagnostics", mode="before")
    @classmethod
    def _diag_none_is_empty(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({} if s is None else s) for k, s in v.items()}
        return v

    # -- derived -----------------------------------------------------------------------------
    @property
    def is_task(self) -> bool:
        return self.task is not None

    @property
    def workload(self) -> str:
        return self.task if self.task is not None else str(self.algorithm)

    @property
    def env_ids(self) -> list[str]:
        """The env ids of the spec (one, or every option of an env marker)."""
        if self.env is None:
            return []
        return S.marker_options(self.env) if isinstance(self.env, dict) else [self.env]

    @property
    def env_label(self) -> str | None:
        return None if self.env is None else (self.env if isinstance(self.env, str) else S.describe(self.env))

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)

    def spec_hash(self) -> str:
        """sha256 over the resolved spec (canonical JSON), first 12 hex digits."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise SpecError(None, text, "an override must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SpecError(None, text, "an override needs a key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(None, key, " ".join(f"value is not valid YAML: {problem}".split()), raw) from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError(None, ".".join(path), f"cannot set a key inside {part!r}, which is not a mapping")
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (a spec, a cluster config); every failure is one SpecError.

    ``what`` names the document in the messages ("spec", "cluster config").
    """
    file = str(path)
    p = Path(path)
    if not p.exists():
        raise SpecError(file, "", f"{what} file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise yaml_error(file, e) from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, unreadable, not text
        raise SpecError(file, "", f"cannot read the {what} file: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        article = "an" if what[0] in "aeiou" else "a"
        raise SpecError(file, "", f"{article} {what} must be a YAML mapping", type(data).__name__)
    return data


def load_spec(
    source: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check_names: bool = True,
) -> Spec:
    """Load a spec from a YAML path or a dict, apply ``key=value`` overrides, validate it."""
    file: str | None = None
    if isinstance(source, dict):
        data = source
    else:
        file = str(source)
        data = load_yaml_mapping(source, "spec")
    data = apply_overrides(data, overrides)
    spec = validate_schema(data, file)
    spec._file = file  # type: ignore[attr-defined]
    if check_names:
        validate_names(spec, file)
    return spec


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_for(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names allowed at ``loc`` inside ``model`` (for unknown-key errors)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (inspect.isclass(current) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        current = next(
            (a for a in getattr(ann, "__args__", (ann,)) if inspect.isclass(a) and issubclass(a, BaseModel)),
            None,
        )
    if inspect.isclass(current) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def pydantic_to_spec_error(err: ValidationError, model: type[BaseModel], file: str | None, prefix: str = "") -> SpecError:
    e = err.errors()[0]
    key = _loc(e["loc"])
    key = f"{prefix}.{key}" if prefix and key else (prefix or key)
    if e["type"] == "extra_forbidden":
        allowed = _allowed_for(model, e["loc"]) or []
        close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=3)
        hint = f"unknown key{'; did you mean ' + ' or '.join(close) + '?' if close else ''}"
        return SpecError(file, key, hint, allowed=allowed)
    if e["type"] == "literal_error":
        expected = e.get("ctx", {}).get("expected", "")
        return SpecError(file, key, "invalid value", e.get("input"), allowed=expected)
    return SpecError(file, key, e["msg"], e.get("input", ...))


def validate_schema(data: dict[str, Any], file: str | None) -> Spec:
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise pydantic_to_spec_error(err, Spec, file) from None
    if spec.task is None and spec.algorithm is None:
        raise SpecError(file, "algorithm", "a spec needs `algorithm` (with `env`) or `task`")
    if spec.task is not None and spec.env is not None:
        raise SpecError(file, "env", "a task spec takes no `env` (the task defines its data)", spec.env)
    if isinstance(spec.env, dict):
        if not S.is_marker(spec.env) or next(iter(spec.env)) not in ("grid", "choice"):
            raise SpecError(file, "env", "env must be an env id or a grid/choice marker over env ids", spec.env,
                            allowed=["grid", "choice"])
    try:
        S.validate_markers(spec.env, "env") if isinstance(spec.env, dict) else None
        S.validate_markers(spec.config, "config")
        if spec.scheduler and spec.scheduler.mutations:
            S.validate_markers(spec.scheduler.mutations, "scheduler.mutations")
    except S.MarkerError as e:
        raise SpecError(file, e.path, e.message, e.value, allowed=S.MARKERS if "marker" in e.message else None) from None
    if spec.scheduler and spec.scheduler.type in ("asha", "pbt") and not spec.metric:
        raise SpecError(file, "metric", f"the {spec.scheduler.type} scheduler needs `metric` (and `mode`)")
    if spec.search and spec.search.type == "optuna":
        if not spec.metric:
            raise SpecError(file, "metric", "the optuna searcher needs `metric` (and `mode`)")
        if S.has_grid(spec.config):
            path = next(p for p, m in S.walk_markers(spec.config, "config") if "grid" in m)
            raise SpecError(file, f"{path}.grid", "the optuna searcher cannot grid; use a choice marker",
                            allowed=["choice", "uniform", "loguniform", "randint"])
    if spec.scheduler and spec.scheduler.type == "pbt" and not spec.scheduler.mutations:
        raise SpecError(file, "scheduler.mutations", "pbt needs at least one mutation")
    _validate_pack_seeds(spec, file)
    return spec


def _validate_pack_seeds(spec: Spec, file: str | None) -> None:
    """``pack_seeds`` K > 1: the seeds split into packs of exactly K (no ragged last pack: every trial then
    costs the same), and only schedulers and searchers that treat a trial as a unit may run the packs."""
    k = spec.pack_seeds
    if k == 1:
        return
    if len(spec.seeds) % k:
        raise SpecError(file, "pack_seeds", f"must divide the number of seeds ({len(spec.seeds)}) so every "
                        "trial packs the same number", k,
                        allowed=[d for d in range(1, len(spec.seeds) + 1) if len(spec.seeds) % d == 0])
    if spec.scheduler and spec.scheduler.type in ("asha", "pbt"):
        raise SpecError(file, "pack_seeds", f"the {spec.scheduler.type} scheduler stops or mutates trials one "
                        "by one, which needs one trial per seed; use pack_seeds: 1 or scheduler fifo", k,
                        allowed=["1 with asha/pbt", "any with fifo or no scheduler"])
    if spec.search and spec.search.type == "optuna":
        raise SpecError(file, "pack_seeds", "the optuna searcher repeats each sample per seed as its own "
                        "trial; use pack_seeds: 1", k, allowed=[1])


# ----------------------------------------------------------------------------------------------
# Names: imports, algorithm / task, env, config keys, diagnostics
# ----------------------------------------------------------------------------------------------
def import_user_modules(modules: list[str], file: str | None = None) -> None:
    for i, mod in enumerate(modules):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - report any import failure with its key
            raise SpecError(file, f"imports[{i}]", f"cannot import module: {type(e).__name__}: {e}", mod) from None


BUILDER_METHODS = (
    "environment", "env_runners", "learners", "training", "evaluation", "rl_module", "debugging",
    "reporting", "checkpointing", "fault_tolerance", "resources", "framework", "api_stack",
    "multi_agent", "offline_data", "callbacks", "experimental",
)
# Keys the spec sets elsewhere (top-level env, seeds) or that orchestration manages.
RESERVED_CONFIG_KEYS = {"env", "seed", ORCHESTRA_KEY}


def set_algorithm_config_value(cfg: Any, keys: dict[str, str], key: str, value: Any) -> None:
    """Set one flat spec key on an AlgorithmConfig: through its builder method (``keys`` from
    :func:`algorithm_config_keys`), else as a plain attribute (``update_from_dict``)."""
    if keys.get(key, "attr") != "attr":
        getattr(cfg, keys[key])(**{key: value})
    else:
        cfg.update_from_dict({key: value})


def param_space_key(config: Any, key: str) -> str:
    """The name under which Tune's param space carries spec config key ``key`` (``config``: the algorithm's
    default AlgorithmConfig).

    Tune hands the trial config to RLlib as a dict, which ``AlgorithmConfig.update_from_dict`` applies
    with ``setattr``. Keys that are read-only properties there (``model_config``, ``learner_class``,
    ``is_atari``...) go to the private attribute their builder method sets (``rl_module(model_config=)``
    sets ``_model_config``); every other key is carried as it is.
    """
    prop = inspect.getattr_static(type(config), key, None)
    if isinstance(prop, property) and prop.fset is None and hasattr(config, f"_{key}"):
        return f"_{key}"
    return key


def algorithm_config_keys(algo_cls: type) -> dict[str, str]:
    """Flat config keys an RLlib algorithm accepts: {key: builder method or "attr"}.

    Keys are the keyword arguments of the AlgorithmConfig builder methods (``training(lr=...)``,
    ``env_runners(num_env_runners=...)``...) plus plain attributes of ``to_dict()``.
    """
    cfg = algo_cls.get_default_config()
    keys: dict[str, str] = {}
    for method in BUILDER_METHODS:
        # Subclasses (PPOConfig.training) take their own keywords and pass **kwargs to the base.
        for klass in type(cfg).__mro__:
            fn = klass.__dict__.get(method)
            if fn is None:
                continue
            for name, p in inspect.signature(fn).parameters.items():
                if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                    keys.setdefault(name, method)
    for name in cfg.to_dict():
        if not name.startswith("_"):
            keys.setdefault(name, "attr")
    return keys


def validate_names(spec: Spec, file: str | None = None) -> None:
    """Resolve the spec's names (after its imports) and check config keys and diagnostics."""
    from algorithms import registry as R
    from algorithms.diagnostics import registry as D

    R.load_builtin_plugins()
    import_user_modules(spec.imports, file)
    if spec.is_task:
        _validate_task(spec, file)
    else:
        _validate_rllib(spec, file)
    for name, settings in spec.diagnostics.items():
        try:
            diag = D.get_diagnostic(name)
        except KeyError:
            close = difflib.get_close_matches(name, D.registered_diagnostics(), n=3)
            hint = f"unknown diagnostic{'; did you mean ' + ' or '.join(close) + '?' if close else ''}"
            raise SpecError(file, f"diagnostics.{name}", hint, allowed=D.registered_diagnostics()) from None
        try:
            diag.settings.model_validate(settings)
        except ValidationError as err:
            raise pydantic_to_spec_error(err, diag.settings, file, prefix=f"diagnostics.{name}") from None
        hook = diag.task_hook if spec.is_task else diag.rllib_callback
        if hook is None:
            kind = "tasks" if spec.is_task else "RLlib algorithms"
            raise SpecError(file, f"diagnostics.{name}", f"this diagnostic does not support {kind}")


def _resolve_task(spec: Spec, file: str | None) -> type:
    from algorithms import registry as R

    name = spec.task if spec.task is not None else spec.algorithm
    key = "task" if spec.task is not None else "algorithm"
    try:
        return R.get_task_class(name)
    except KeyError:
        raise SpecError(file, key, "unknown task", name, allowed=R.registered_tasks()) from None
    except Exception as e:  # noqa: BLE001
        raise SpecError(file, key, f"cannot load task: {type(e).__name__}: {e}", name) from None


def _validate_task(spec: Spec, file: str | None) -> None:
    task_cls = _resolve_task(spec, file)
    if spec.pack_seeds > 1:
        raise SpecError(file, "pack_seeds", f"task {spec.workload} cannot train seeds as replicas of one trial",
                        spec.pack_seeds, allowed=[1])
    for assignment, variant in S.grid_variants(spec.config):
        cfg = S.representative(variant)
        try:
            task_cls.Config.model_validate(cfg)
        except ValidationError as err:
            where = f" (with {', '.join(f'{k}={v!r}' for k, v in assignment.items())})" if assignment else ""
            e = pydantic_to_spec_error(err, task_cls.Config, file, prefix="config")
            raise SpecError(file, e.key, e.message + where, e.value, e.allowed) from None


def resolve_algorithm(spec: Spec, file: str | None = None) -> type:
    from algorithms import registry as R

    try:
        return R.get_algorithm_class(spec.algorithm)
    except KeyError:
        allowed = R.registered_algorithms() + R.rllib_algorithms() + R.registered_tasks()
        close = difflib.get_close_matches(spec.algorithm, allowed, n=3)
        hint = f"unknown algorithm{'; did you mean ' + ' or '.join(close) + '?' if close else ''}"
        raise SpecError(file, "algorithm", hint, spec.algorithm, allowed=allowed) from None
    except Exception as e:  # noqa: BLE001
        raise SpecError(file, "algorithm", f"cannot load algorithm: {type(e).__name__}: {e}", spec.algorithm) from None


def _validate_rllib(spec: Spec, file: str | None) -> None:
    from algorithms import registry as R

    if spec.algorithm in R.registered_tasks():
        spec.task, spec.algorithm = spec.algorithm, None
        _validate_task(spec, file)
        return
    algo_cls = resolve_algorithm(spec, file)
    if spec.pack_seeds > 1 and not getattr(algo_cls, "supports_pack_seeds", False):
        raise SpecError(file, "pack_seeds", f"{spec.algorithm} cannot train seeds as replicas of one trial",
                        spec.pack_seeds, allowed="1, or an algorithm declaring supports_pack_seeds (EVE, WPO)")
    if spec.env is None:
        raise SpecError(file, "env", "an RLlib algorithm needs `env`")
    for env in spec.env_ids:
        check_env(env, file)
    keys = algorithm_config_keys(algo_cls)
    blocks = R.config_blocks()
    for key, value in spec.config.items():
        if key in RESERVED_CONFIG_KEYS:
            where = "the top-level `env`" if key == "env" else "`seeds`" if key == "seed" else "orchestration"
            raise SpecError(file, f"config.{key}", f"set by {where}, not inside config")
        if key in blocks:
            for opt in S.grid_variants(value):
                try:
                    block = blocks[key].model.model_validate(S.representative(opt[1]))
                except ValidationError as err:
                    raise pydantic_to_spec_error(err, blocks[key].model, file, prefix=f"config.{key}") from None
                default = algo_cls.get_default_config()
                if not hasattr(default, key):
                    try:  # the block must apply to this algorithm (e.g. `network` supports PPO and DQN)
                        blocks[key].apply(default, block)
                    except Exception as e:  # noqa: BLE001 - report whatever the block rejects
                        raise SpecError(file, f"config.{key}", f"cannot apply to {algo_cls.__name__}: {e}") from None
            continue
        if key not in keys:
            allowed = sorted(keys) + sorted(blocks)
            close = difflib.get_close_matches(key, allowed, n=3)
            hint = f"unknown key for {algo_cls.__name__}{'; did you mean ' + ' or '.join(close) + '?' if close else ''}"
            raise SpecError(file, f"config.{key}", hint, allowed=f"keys of {type(algo_cls.get_default_config()).__name__} builder methods (e.g. {', '.join(close or sorted(keys)[:5])})")
    _validate_algorithm_values(spec, algo_cls, keys, blocks, file)


@contextlib.contextmanager
def _quiet_rllib_config() -> Iterator[None]:
    """Hold back RLlib's config notices while checking a spec ("You are running WPO on the new API stack!"): a
    bad value must be the one line `orchestra validate` prints; errors still raise."""
    log = logging.getLogger("ray.rllib.algorithms.algorithm_config")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _validate_algorithm_values(spec: Spec, algo_cls: type, keys: dict[str, str], blocks: dict[str, Any],
                               file: str | None) -> None:
    """Run the project algorithms' own value checks (``AlgorithmConfig.validate``: each setting through the
    algorithm's settings model, e.g. WPO's ``config.num_action_samples: got 0; allowed: an int >= 1``) on
    every grid variant of ``config``, so a bad value stops the launch before Ray starts instead of failing
    each trial. RLlib's own algorithms are left to RLlib (their validate() needs the env's spaces and
    resources)."""
    from algorithms.offpolicy.config import OffPolicyConfig

    if not isinstance(algo_cls.get_default_config(), OffPolicyConfig):
        return
    env = S.representative(spec.env)
    for assignment, variant in S.grid_variants(spec.config):
        values = {k: v for k, v in S.representative(variant).items() if k not in blocks}
        cfg = algo_cls.get_default_config().environment(env=env)
        if spec.pack_seeds > 1:  # what each packed trial gets (checks settings packing cannot run with)
            cfg.replica_seeds = list(spec.seeds[: spec.pack_seeds])
        where = f" (with {', '.join(f'{k}={v!r}' for k, v in assignment.items())})" if assignment else ""
        key = "config"
        try:
            for key_, value in values.items():
                key = f"config.{key_}"
                set_algorithm_config_value(cfg, keys, key_, value)
            key = "config"
            with _quiet_rllib_config():
                cfg.validate()
        except SettingError as e:  # a value outside its settings model's bounds (algorithms/settings.py)
            on_env = e.key == "action_space"  # the env's, not a config key
            err = SpecError(file, "env" if on_env else f"config.{e.key}",
                            f"{'action_space: ' if on_env else ''}got {e.value!r}; allowed: {e.allowed}{where}")
            err.value, err.allowed = e.value, e.allowed
            raise err from None
        except Exception as e:  # noqa: BLE001 - the algorithm's own message names the key and allowed values
            msg = str(e).strip()
            named = [msg.split(":", 1)[0].strip(), *re.findall(r"`(\w+)`", msg)]
            if key == "config" and any(n in values for n in named):
                key = "config." + next(n for n in named if n in values)
            raise SpecError(file, key, msg + where) from None


def settings_model(name: str) -> type[BaseModel]:
    """The settings model of an algorithm (its config's ``SETTINGS``, e.g. WPO's WPOSettings) or a task (its
    ``Config``); a :class:`UserError` naming the allowed names when ``name`` has none."""
    from algorithms import registry as R

    R.load_builtin_plugins()
    models: dict[str, type[BaseModel]] = {}
    for algo in R.registered_algorithms():
        model = getattr(R.get_algorithm_class(algo).get_default_config(), "SETTINGS", None)
        if isinstance(model, type) and issubclass(model, BaseModel):
            models[algo] = model
    for task in R.registered_tasks():
        models[task] = R.get_task_class(task).Config
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"--settings {name!r}: no settings model{hint} (RLlib's own algorithms are documented by "
                        f"RLlib); allowed: {', '.join(models)}")
    return models[name]


def settings_listing(name: str) -> list[str]:
    """``orchestra validate --settings NAME``: a header, then one line per setting of NAME's settings model
    (:func:`settings_model`): name, type, default, allowed values or bounds, doc, in the model's order."""
    from algorithms.settings import settings_rows

    model = settings_model(name)
    rows = [("name", "type", "default", "allowed", "doc"), *settings_rows(model)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{name} settings ({model.__module__}.{model.__qualname__}; set them under `config:` in a spec):"]
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    return [line.rstrip() for line in lines]


def import_builtin_envs() -> None:
    """Register the project's envs (dmc/..., bsuite/..., minatar/...) with gymnasium."""
    try:
        importlib.import_module("algorithms.envs")
    except ModuleNotFoundError as e:
        if e.name != "algorithms.envs":
            raise


def check_env(name: str, file: str | None) -> None:
    """The env must be a gymnasium id (after imports and our registrations) or a Tune-registered env."""
    import gymnasium as gym

    import_builtin_envs()
    if name in gym.registry:
        return
    from algorithms.ray_compat import registered_env_creator

    if registered_env_creator(name) is not None:
        return
    close = difflib.get_close_matches(name, list(gym.registry), n=3)
    hint = f"unknown env{'; did you mean ' + ' or '.join(close) + '?' if close else ''}"
    raise SpecError(file, "env", hint, name, allowed="gymnasium ids (e.g. CartPole-v1, dmc/cartpole-swingup) or envs registered by `imports`")
