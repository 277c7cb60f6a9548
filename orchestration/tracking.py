"""MLflow tracking for Tune launches: one parent run per launch, one nested child run per trial.

The callback runs in the Tune driver. Trials never talk to MLflow; they return numbers in their
results and write files under ``<trial dir>/artifacts/``, and this module logs both.

Layout in MLflow
- one experiment per spec name (created with ``artifact_location`` when new);
- one parent run per launch, tagged ``orchestra.launch_id`` and ``orchestra.run_type=launch`` plus the
  launch tags (spec hash, git commit, command line), params = the flattened resolved spec, artifacts
  = the resolved spec and ``pip freeze``;
- one nested child run per trial (tag ``mlflow.parentRunId``), tagged ``orchestra.trial_id``,
  ``orchestra.seed``, ``orchestra.run_type=trial``, the launch tags and the trial tags (algorithm,
  env or task); params = the flattened trial config.

Metrics
Each result is flattened with ``/``; numeric leaves (bool -> 0/1) whose first key segment is a metric
group (``METRIC_GROUPS`` plus ``extra_metric_prefixes``) are logged with step ``result["steps"]``
(fallback ``training_iteration``). NaN and +-inf are logged as they are: MLflow stores them, and a
diverging loss is exactly what a curve must show. Added by the callback (never overriding a key the
trial reported itself):
- ``system/iteration_time_s`` = ``time_this_iter_s``;
- ``system/steps_per_s`` = (steps_t - steps_{t-1}) / time_this_iter_s;
- ``system/env_steps_per_s`` = env steps sampled this iteration / time_this_iter_s (RLlib's
  ``num_env_steps_sampled`` under ``env/`` or ``env_runners/``);
- ``system/updates_per_s`` = sum over learner modules of num_module_steps_trained /
  module_train_batch_size_mean (minibatch SGD updates this iteration) / time_this_iter_s;
- ``hparam/<config.key>``: a numeric config value that changed since the trial's previous result
  (PBT mutations; MLflow params cannot change). Tune's scheduler mutates ``trial.config`` before
  callbacks see the result that triggered the exploit, so the new value is logged at that result's
  step: the trial trains with it from that step on. If that result is dropped (the exploit restarts
  the trial from an older checkpoint, see below), the value moves to the next result that is kept.

Delivery
The driver only journals and enqueues: each result becomes one JSON line appended to the trial's
journal ``<trial dir>/mlflow_spool.jsonl`` and one queue entry. A background thread sends the queue in
order with ``MlflowClient.log_batch`` (<= ``max_batch`` metrics per call), retrying failed calls
until they succeed; MLflow's own HTTP retries are turned off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``
unless set) so an unreachable server costs one refused connection per attempt, never the driver's
time. At experiment end the driver waits at most ``retry_timeout_s`` for the queue to drain (default
30 s, or ``$ORCHESTRA_MLFLOW_RETRY_TIMEOUT_S``: the test suite sets a generous one, since a loaded
machine may need longer than 30 s to deliver a launch); journals of trials that were fully delivered
are deleted, the others stay for ``orchestra sync`` (:func:`sync_spool`).

Statuses
A child ends FINISHED when its trial completes, FAILED when it errors (tag ``orchestra.error``: the
end of Tune's error text, where the exception message is), KILLED when the experiment ends with the
trial still running (Ctrl-C); ``orchestra.status`` repeats it as a tag. The parent ends KILLED if any
trial was killed, else FAILED if any failed, else FINISHED. Files under the trial's ``artifacts/``
folder (looked up in the trial's storage dir, its driver staging dir and its working dir) are uploaded
on every checkpoint and at the end, only those new or changed (size, mtime) since the last upload.

Steps are strictly increasing per run: a result whose step is at or below the run's last logged step
is dropped (Tune restoring a trial from a checkpoint replays steps; MLflow cannot delete points).
On resume (also after the driver was SIGKILLed, so nothing here relies on pickled state) the parent is
found by its ``orchestra.launch_id`` tag and each child by ``orchestra.trial_id``; the child's last
logged step is read back from MLflow, the journal left by the killed driver is replayed above it, and
new results continue above that. A result split over several ``log_batch`` calls (> ``max_batch``
metrics) that was cut by a kill keeps the part that arrived.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)

METRIC_GROUPS: tuple[str, ...] = (
    "env", "eval", "learner", "train", "plasticity", "credit", "exploration", "uncertainty",
    "convergence", "meta", "system", "hparam",
)
SPOOL_NAME = "mlflow_spool.jsonl"
RETRY_TIMEOUT_ENV = "ORCHESTRA_MLFLOW_RETRY_TIMEOUT_S"
DEFAULT_RETRY_TIMEOUT_S = 30.0

# MLflow's limits (mlflow.utils.validation): key length, param value length, tag value length,
# params/tags per log_batch call, metrics per call.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_ERROR_LENGTH = 4000

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


# --------------------------------------------------------------------------- pure helpers
def sanitize_key(key: str) -> str:
    """Map ``key`` to a name MLflow accepts: letters, digits, ``_ - . /`` and space, no empty,
    ``.`` or ``..`` path segments, no leading slash, at most 250 characters."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p if p not in ("", ".", "..") else "_" for p in key.strip("/").split("/")]
    return "/".join(parts)[:MAX_KEY_LENGTH] or "_"


def flatten(tree: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level, keys joined with ``sep``: {"a": {"b": 1}} -> {"a<sep>b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out


def as_number(value: Any) -> float | None:
    """A metric value as float (bool -> 0.0/1.0, numpy and 0-d array scalars too), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config as MLflow params: nested keys joined with ``.``, keys sanitised, values
    stringified and cut to MLflow's 6000 characters."""
    return {
        sanitize_key(k): str(v)[:MAX_PARAM_VALUE_LENGTH] for k, v in flatten(config, ".").items()
    }


def metric_leaves(result: Mapping[str, Any], groups: Iterable[str]) -> dict[str, float]:
    """Numeric leaves of ``result`` flattened with ``/`` whose first segment is in ``groups``."""
    groups = set(groups)
    out: dict[str, float] = {}
    for top, sub in result.items():
        if str(top).split("/", 1)[0] not in groups:
            continue
        leaves = flatten(sub, "/", str(top)) if isinstance(sub, Mapping) else {str(top): sub}
        for k, v in leaves.items():
            x = as_number(v)
            if x is not None:
                out[sanitize_key(k)] = x
    return out


def result_step(result: Mapping[str, Any]) -> int | None:
    """The MLflow step of a result: ``steps`` (env steps or task steps), else training_iteration."""
    for key in ("steps", "training_iteration"):
        x = as_number(result.get(key))
        if x is not None and math.isfinite(x):
            return int(x)
    return None


def _first(flat: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    for k in keys:
        x = as_number(flat.get(k))
        if x is not None and math.isfinite(x):
            return x
    return None


def throughput_metrics(flat: Mapping[str, Any], prev_steps: float | None) -> dict[str, float]:
    """``system/`` throughput of one result (see the module docstring for the definitions).

    ``flat`` is the result flattened with ``/``; ``prev_steps`` the previous result's step counter.
    """
    out: dict[str, float] = {}
    dt = _first(flat, ["time_this_iter_s"])
    if dt is None:
        return out
    out["system/iteration_time_s"] = dt
    if dt <= 0:
        return out
    steps = _first(flat, ["steps"])
    if steps is not None and prev_steps is not None and steps >= prev_steps:
        out["system/steps_per_s"] = (steps - prev_steps) / dt
    env_steps = _first(flat, ["env/num_env_steps_sampled", "env_runners/num_env_steps_sampled"])
    if env_steps is not None:
        out["system/env_steps_per_s"] = env_steps / dt
    updates = 0.0
    found = False
    for k, v in flat.items():
        head, _, tail = k.rpartition("/")
        if tail != "num_module_steps_trained" or head.split("/", 1)[0] not in ("learner", "learners"):
            continue
        if head.endswith("__all_modules__"):
            continue
        trained = as_number(v)
        batch = as_number(flat.get(f"{head}/module_train_batch_size_mean"))
        if trained is not None and batch and batch > 0:
            updates += trained / batch
            found = True
    if found:
        out["system/updates_per_s"] = updates / dt
    return out


def changed_hparams(old: Mapping[str, str], new_config: Mapping[str, Any]) -> dict[str, float]:
    """``hparam/<key>`` for each numeric value of the flattened config that differs from ``old``
    (the previous flattened params)."""
    out = {}
    for k, v in flatten(new_config, ".").items():
        key = sanitize_key(k)
        x = as_number(v)
        if x is not None and key in old and old[key] != str(v):
            out[sanitize_key(f"hparam/{k}")] = x
    return out


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 20] + "\n...[truncated]"


def _tail(text: str, n: int) -> str:
    """The end of a traceback, where the exception message is."""
    return text if len(text) <= n else "[truncated]...\n" + text[-(n - 20):]


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ray", "torch", "mlflow"):
        try:
            out[f"orchestra.{pkg}_version"] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- MLflow store access
def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# MLflow 3's UI opens an experiment by its kind: untagged or GenAI experiments land on the GenAI
# overview / traces, ``custom_model_development`` on the runs table of the model-training view. The tag
# and value are the ones the UI's own "experiment type" selector writes (setExperimentTag).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def mark_training_experiment(client, exp) -> None:
    """Tag ``exp`` (an ``mlflow.entities.Experiment``) as a model-training experiment unless it already
    has a kind (a kind chosen in the UI is kept)."""
    if not (exp.tags or {}).get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def require_experiment(client, name: str, uri: str):
    """The active experiment ``name``, or a UserError naming the store and the existing experiments."""
    from mlflow.entities import ViewType

    from orchestration.spec import UserError

    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
        raise UserError(f"no experiment {name!r} in {uri}; existing: {', '.join(names) or 'none'}")
    return exp


def _experiment_id(client, name: str, artifact_location: str | None, create: bool = True) -> str | None:
    """Get or create experiment ``name`` (restored if deleted), tagged as a model-training experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        mark_training_experiment(client, exp)
        return exp.experiment_id
    if not create:
        return None
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        mark_training_experiment(client, exp)
        return exp.experiment_id


def _find_parent(client, experiment_id: str, launch_id: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`orchestra.launch_id` = {_quote(launch_id)} "
        "and tags.`orchestra.run_type` = 'launch'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _find_child(client, experiment_id: str, parent_id: str, trial_id: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = {_quote(parent_id)} "
        f"and tags.`orchestra.trial_id` = {_quote(trial_id)}",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def last_logged_step(run) -> int | None:
    """Largest step among a run's metrics. MLflow keeps, per key, the point with the largest
    (step, timestamp, value) as the key's latest value, so the maximum over latest values is the
    maximum over the whole history."""
    metrics = run.data.to_proto().metrics
    return max((int(m.step) for m in metrics), default=None)


def find_parent_run(tracking_uri: str, experiment: str, launch_id: str):
    """The launch's parent run (an ``mlflow.entities.Run``), or None."""
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment, None, create=False)
    return None if exp_id is None else _find_parent(client, exp_id, launch_id)


def _log_params(client, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk, synchronous=True)


def _create_run(client, experiment_id: str, name: str | None, tags: Mapping[str, str]):
    """Create a run with all its tags in one request, so a run found by its tags is complete."""
    return client.create_run(experiment_id, run_name=name,
                             tags={k: _truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()})


def _log_missing_params(client, run, params: Mapping[str, str]) -> None:
    have = run.data.params
    _log_params(client, run.info.run_id, {k: v for k, v in params.items() if k not in have})


def _set_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, _truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
    for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=chunk, synchronous=True)


def _above(records: Iterable[dict], last: int | None) -> list[dict]:
    """Metric records whose step is above ``last`` and above every earlier kept record's step."""
    fresh = []
    for rec in records:
        if last is None or rec["step"] > last:
            fresh.append(rec)
            last = rec["step"]
    return fresh


def _log_metric_records(client, run_id: str, records: list[dict], max_batch: int, on_sent=None) -> int:
    """Send journal records ({"step", "ts", "metrics"}) in order, <= max_batch metrics per call.
    Calls are cut at record boundaries (a record with more than max_batch metrics is split alone),
    and ``on_sent(step)`` reports the last record fully sent after each call."""
    from mlflow.entities import Metric

    def send(batch: list, step: int | None) -> None:
        client.log_batch(run_id, metrics=batch, synchronous=True)
        if on_sent is not None and step is not None:
            on_sent(step)

    batch: list = []
    sent = 0
    prev_step: int | None = None
    for rec in records:
        metrics = [Metric(k, float(v), int(rec["ts"]), int(rec["step"])) for k, v in rec["metrics"].items()]
        if batch and len(batch) + len(metrics) > max_batch:
            send(batch, prev_step)
            sent += len(batch)
            batch = []
        for chunk in _chunks(metrics, max_batch):
            if len(batch) + len(chunk) > max_batch:
                send(batch, None)
                sent += len(batch)
                batch = []
            batch.extend(chunk)
        prev_step = int(rec["step"])
    if batch:
        send(batch, prev_step)
        sent += len(batch)
    return sent


def _is_transient(exc: BaseException) -> bool:
    """Server unreachable, overloaded or locked: worth retrying. A request MLflow rejects (bad
    value, changed param, missing run) fails the same way again and is dropped instead."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in (
            "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
            "ENDPOINT_NOT_FOUND",
        )
    return isinstance(exc, OSError | TimeoutError | ConnectionError) or "Connection" in type(exc).__name__


# --------------------------------------------------------------------------- the callback
@dataclass
class _TrialState:
    """Driver-side bookkeeping for one trial (rebuilt from MLflow and the journal on resume)."""

    trial_id: str
    name: str
    journal: Path
    params: dict[str, str]
    tags: dict[str, str]
    artifact_dirs: list[Path]
    prev_steps: float | None = None
    pending: int = 0  # queue entries not yet delivered
    done: bool = False
    uploaded: dict[str, tuple] = field(default_factory=dict)  # worker-side only
    node_ips: set[str] = field(default_factory=set)  # nodes the trial reported from (multi-node runs)


class MLflowTracking(Callback):
    """Tune callback logging a launch to MLflow (see the module docstring for the contract).

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///abs/path.db``, ``http://127.0.0.1:5000``).
        experiment: experiment name (the spec name).
        launch_id: identifies the launch across resumes; tag ``orchestra.launch_id`` of the parent.
        artifact_location: artifact root for a new experiment (absolute dir or URI).
        launch_tags: tags of the parent, copied to every child (spec hash, git commit, command).
        launch_params: flattened resolved spec (nested dicts are flattened with ``.``).
        launch_artifacts: {artifact name: local file path} uploaded to the parent.
        trial_tags: tags common to every child (algorithm, env or task).
        resumed: the launch continues an earlier one. The parent is looked up by ``launch_id`` in any
            case (a restored Tuner may carry a callback pickled with ``resumed=False``).
        flush_interval_s: how often the background thread sends the queue.
        max_batch: metrics per ``log_batch`` call (MLflow allows 1000).
        retry_timeout_s: how long ``on_experiment_end`` waits for undelivered data (None:
            ``$ORCHESTRA_MLFLOW_RETRY_TIMEOUT_S`` if set, else 30 s).
        extra_metric_prefixes: result groups logged besides ``METRIC_GROUPS``.
        spool_dir: where journals go when a trial's directory is not on the local filesystem.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        launch_id: str,
        *,
        artifact_location: str | None = None,
        launch_tags: dict[str, str] | None = None,
        launch_params: dict | None = None,
        launch_artifacts: dict[str, str] | None = None,
        trial_tags: dict[str, str] | None = None,
        resumed: bool = False,
        flush_interval_s: float = 2.0,
        max_batch: int = 1000,
        retry_timeout_s: float | None = None,
        extra_metric_prefixes: Iterable[str] = (),
        spool_dir: str | None = None,
    ):
        if not 1 <= max_batch <= MAX_METRICS_PER_BATCH:
            raise ValueError(f"max_batch={max_batch}: allowed 1..{MAX_METRICS_PER_BATCH} (MLflow's limit)")
        if retry_timeout_s is None:
            retry_timeout_s = float(os.environ.get(RETRY_TIMEOUT_ENV) or DEFAULT_RETRY_TIMEOUT_S)
        if flush_interval_s <= 0 or retry_timeout_s < 0:
            raise ValueError(
                f"flush_interval_s={flush_interval_s} must be > 0 and retry_timeout_s={retry_timeout_s} >= 0"
            )
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.launch_id = launch_id
        self.artifact_location = artifact_location
        self.launch_tags = {k: str(v) for k, v in (launch_tags or {}).items()}
        self.launch_params = dict(launch_params or {})
        self.launch_artifacts = dict(launch_artifacts or {})
        self.trial_tags = {k: str(v) for k, v in (trial_tags or {}).items()}
        self.resumed = resumed
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.retry_timeout_s = retry_timeout_s
        self.metric_groups = tuple(METRIC_GROUPS) + tuple(extra_metric_prefixes)
        self.spool_dir = spool_dir
        self.parent_run_id: str | None = None
        self._init_runtime()

    # ---- pickling: Tune pickles callbacks with the run config; threads, locks, files stay behind
    def _init_runtime(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._queued_metrics = 0
        self._trials: dict[str, _TrialState] = {}
        self._run_ids: dict[str | None, str] = {}  # trial_id (None = parent) -> run id, worker-side
        self._last_step: dict[str, int | None] = {}  # trial_id -> last step sent or queued, worker-side
        self._experiment_id: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._flush_now = False
        self._parent_ready = threading.Event()
        self._files: dict[str, Any] = {}
        self._dropped = 0
        self._adopted = False
        self._carry: dict[str, dict[str, float]] = {}  # trial_id -> hparam/ values of dropped results
        self._created: set[str] = set()  # runs this driver created (a retry must not count as resume)
        self._resume_marked = False
        self._killed_launch = False

    def __getstate__(self) -> dict:
        keep = (
            "tracking_uri", "experiment", "launch_id", "artifact_location", "launch_tags",
            "launch_params", "launch_artifacts", "trial_tags", "resumed", "flush_interval_s",
            "max_batch", "retry_timeout_s", "metric_groups", "spool_dir",
        )
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.parent_run_id = None
        self._init_runtime()

    # ---- Tune hooks (driver thread: journal + enqueue only)
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        # Our thread does the retrying; MLflow's default (7 retries, backoff x2) would hold a request
        # for minutes while the server is away.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        artifacts = {}
        for name, path in self.launch_artifacts.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"launch_artifacts[{name!r}]: no file at {path}")
            artifacts[name] = Path(path).read_bytes()
        tags = {**_versions(), **self.launch_tags}
        self._enqueue(("parent", tags, flatten_params(self.launch_params), artifacts), None)
        self._start_thread()
        # Wait until the parent exists (so `parent_run_id` is set for callers) or the first attempt
        # failed: a slow store is waited for, an unreachable one is not.
        self._parent_ready.wait(timeout=self.retry_timeout_s)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._adopted:
            return
        self._adopted = True
        # A trial that finished before an earlier driver of this launch was killed is not started
        # again, but its journal may hold results and the end status that never reached MLflow.
        for trial in trials:
            if trial.trial_id in self._trials or trial.status not in ("TERMINATED", "ERROR"):
                continue
            journal = self._journal_path(trial)
            if not journal.exists():
                continue
            ends = [r for r in _read_journal(journal) if r.get("type") == "end"]
            self._open_trial(trial)
            if ends:
                self._end_trial(trial, ends[-1]["status"], None, tags=ends[-1].get("tags"))
            else:
                self._end_trial(trial, "FINISHED" if trial.status == "TERMINATED" else "FAILED", None)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._open_trial(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        st = self._trials.get(trial.trial_id) or self._open_trial(trial)
        if isinstance(result.get("node_ip"), str):
            st.node_ips.add(result["node_ip"])
        step = result_step(result)
        if step is None:
            return
        flat = flatten({k: v for k, v in result.items() if k != "config"}, "/")
        metrics = metric_leaves(flat, self.metric_groups)
        prev = st.prev_steps
        if prev is None and result.get("training_iteration") == 1:
            prev = 0.0
        for k, v in throughput_metrics(flat, prev).items():
            metrics.setdefault(k, v)  # a trial's own system/ keys win
        st.prev_steps = float(step)
        new_params = flatten_params(trial.config)
        metrics.update(changed_hparams(st.params, trial.config))
        st.params.update({k: v for k, v in new_params.items() if k in st.params})
        if not metrics:
            return
        rec = {"type": "metrics", "trial_id": st.trial_id, "step": step, "ts": int(time.time() * 1000),
               "metrics": metrics}
        self._journal(st, rec)
        self._enqueue(("metrics", st.trial_id, rec), st, count=len(metrics))

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        st = self._trials.get(trial.trial_id)
        if st is not None:
            self._enqueue(("artifacts", st.trial_id), st)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end_trial(trial, "FINISHED", None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = None
        try:
            error = trial.get_error()
        except Exception:  # the error file may be on unreachable storage; the status still matters
            error = None
        if not error and trial.error_file and Path(trial.error_file).exists():
            error = Path(trial.error_file).read_text()
        self._end_trial(trial, "FAILED", str(error or "trial raised (no error text recorded)"))

    def on_experiment_end(self, trials: list, **info) -> None:
        for trial in trials:
            st = self._trials.get(trial.trial_id)
            if st is not None and not st.done:
                self._killed_launch = True
                self._end_trial(trial, "KILLED", None)
        statuses = [t.status for t in trials]
        if self._killed_launch:
            status = "KILLED"
        elif any(s == "ERROR" for s in statuses):
            status = "FAILED"
        else:
            status = "FINISHED"
        self._enqueue(("end_parent", status), None)
        self.close(self.retry_timeout_s)

    def get_state(self) -> dict | None:
        return None  # everything needed to continue is in MLflow and the journals

    # ---- driver-side helpers
    def _journal_path(self, trial) -> Path:
        try:
            local = trial.storage.storage_filesystem.type_name == "local"
        except Exception:
            local = False
        if local and trial.path:
            return Path(trial.path) / SPOOL_NAME
        base = Path(self.spool_dir) if self.spool_dir else Path(trial.local_path or ".")
        if self.spool_dir:
            base = base / (trial.storage.trial_dir_name or trial.trial_id)
        return base / SPOOL_NAME

    @staticmethod
    def _artifact_dirs(trial) -> list[Path]:
        dirs = []
        candidates = [getattr(trial, "path", None), getattr(trial, "local_path", None)]
        try:
            candidates.append(trial.storage.trial_working_directory)
        except Exception:
            pass
        for c in candidates:
            if c and Path(c, "artifacts") not in dirs:
                dirs.append(Path(c, "artifacts"))
        return dirs

    def _open_trial(self, trial) -> _TrialState:
        if trial.trial_id in self._trials:  # restarted after a failure or a PBT pause
            st = self._trials[trial.trial_id]
            if st.done:
                st.done = False
                self._enqueue(("reopen", st.trial_id), st)
            return st
        config = dict(trial.config)
        params = flatten_params(config)
        tags = {**_versions(), **self.launch_tags, **self.trial_tags,
                "orchestra.trial_id": trial.trial_id, "orchestra.trial_name": str(trial)}
        if "seed" in config:
            tags["orchestra.seed"] = str(config["seed"])
        if isinstance(config.get("env"), str):  # the env may be a search dimension
            tags["orchestra.env"] = config["env"]
        st = _TrialState(trial.trial_id, str(trial), self._journal_path(trial), params, tags,
                         self._artifact_dirs(trial))
        self._trials[trial.trial_id] = st
        # Records journaled by an earlier driver of this launch (killed, or server unreachable):
        # replayed above the child's last logged step once the child is found.
        replay = [r for r in _read_journal(st.journal) if r.get("type") == "metrics"]
        header = {"type": "trial", "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                  "artifact_location": self.artifact_location, "launch_id": self.launch_id,
                  "launch_tags": {**_versions(), **self.launch_tags},
                  "launch_params": flatten_params(self.launch_params), "trial_id": trial.trial_id,
                  "name": st.name, "tags": tags, "params": params}
        self._journal(st, header)
        self._enqueue(("child", st.trial_id, replay, dict(params)), st)  # params as started
        return st

    def _end_trial(self, trial, status: str, error: str | None, tags: dict | None = None) -> None:
        st = self._trials.get(trial.trial_id)
        if st is None or st.done:
            return
        st.done = True
        tags = {**(tags or {}), "orchestra.status": status}
        if st.node_ips:  # every node the trial ran on, e.g. before and after a node failure
            tags["orchestra.node_ips"] = ",".join(sorted(st.node_ips))
        if error:
            tags["orchestra.error"] = _tail(error, MAX_ERROR_LENGTH)
        self._enqueue(("artifacts", st.trial_id), st)
        rec = {"type": "end", "trial_id": st.trial_id, "status": status, "tags": tags}
        self._journal(st, rec)
        self._enqueue(("end", st.trial_id, status, tags), st)

    def _journal(self, st: _TrialState, rec: dict) -> None:
        f = self._files.get(st.trial_id)
        try:
            if f is None:
                st.journal.parent.mkdir(parents=True, exist_ok=True)
                f = self._files[st.trial_id] = open(st.journal, "a", buffering=1)
            f.write(json.dumps(rec) + "\n")
        except OSError as e:  # a full disk must not stop training; MLflow delivery still goes on
            logger.warning("cannot write MLflow journal %s: %s", st.journal, e)

    def _enqueue(self, op: tuple, st: _TrialState | None, count: int = 0) -> None:
        with self._cond:
            if st is not None:
                st.pending += 1
            self._queue.append((op, st, count))
            self._queued_metrics += count
            if self._queued_metrics >= self.max_batch:
                self._flush_now = True
                self._cond.notify()

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._worker, name="mlflow-tracking", daemon=True)
            self._thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Ask the thread to send now and wait (at most ``timeout`` s) until the queue is empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flush_now = True
            self._cond.notify_all()
            while self._queue:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=min(0.2, left) if left is not None else 0.2)
        return True

    def close(self, timeout: float) -> None:
        """Deliver what can be delivered within ``timeout`` s, stop the thread, keep the journals of
        trials with undelivered data (for ``orchestra sync``) and delete the others."""
        delivered = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 2 * self.flush_interval_s))
        for f in self._files.values():
            f.close()
        self._files.clear()
        with self._cond:  # launch-level data undelivered: sync needs every journal's header
            keep_all = any(st is None for _, st, _ in self._queue)
        kept = []
        for st in self._trials.values():
            if st.pending == 0 and not keep_all:
                st.journal.unlink(missing_ok=True)
            else:
                kept.append(str(st.journal))
        if kept or not delivered:
            logger.warning(
                "MLflow at %s did not take everything within %.0fs; unsent data kept in %s - "
                "send it later with `orchestra sync`", self.tracking_uri, timeout, kept or "(launch data)",
            )

    # ---- background thread: the only place that talks to MLflow
    def _worker(self) -> None:
        client = None
        backoff = self.flush_interval_s
        while True:
            with self._cond:
                if not self._queue and self._stop:
                    return
                if not self._flush_now and not self._stop:
                    self._cond.wait(timeout=self.flush_interval_s)
                self._flush_now = False
                work = list(self._queue)
                if self._stop and not work:
                    return
            if not work:
                continue
            try:
                if client is None:
                    client = _client(self.tracking_uri)
                done = self._process(client, work)
                backoff = self.flush_interval_s
            except Exception as e:
                done = getattr(e, "_orchestra_done", 0)
                if not self._parent_ready.is_set():
                    self._parent_ready.set()
                if _is_transient(e):
                    logger.debug("MLflow unreachable (%s); retrying in %.1fs", e, backoff)
                    self._ack(done)
                    with self._cond:
                        if self._stop and not self._flush_now:
                            return
                        self._cond.wait(timeout=backoff)
                    backoff = min(2 * backoff, max(5.0, self.flush_interval_s))
                    continue
                logger.warning("MLflow rejected %s: %s (dropped)", work[done][0][0], e)
                done += 1
            self._ack(done)

    def _ack(self, n: int) -> None:
        with self._cond:
            for _ in range(n):
                _, st, count = self._queue.popleft()
                self._queued_metrics -= count
                if st is not None:
                    st.pending -= 1
            self._cond.notify_all()

    def _process(self, client, work: list) -> int:
        """Execute queue entries in order; consecutive metric entries of one trial go in shared
        log_batch calls. Returns how many entries were completed (also attached to an exception)."""
        i = 0
        try:
            while i < len(work):
                op = work[i][0]
                if op[0] == "metrics":
                    j = i
                    while j < len(work) and work[j][0][0] == "metrics" and work[j][0][1] == op[1]:
                        j += 1
                    # Send at most ~4 batches per group so acknowledgements stay fine-grained.
                    j = min(j, i + max(1, 4 * self.max_batch // max(1, work[i][2])))
                    self._send_metrics(client, op[1], [w[0][2] for w in work[i:j]])
                    i = j
                else:
                    self._do(client, op)
                    i += 1
        except Exception as e:
            e._orchestra_done = i
            raise
        return i

    def _send_metrics(self, client, trial_id: str, records: list[dict]) -> None:
        # A PBT exploit restarts a trial from an older checkpoint: the results it replays are dropped,
        # but the hparam/ values they carry (the mutation) move to the next result that is kept.
        last = self._last_step.get(trial_id)
        carry = dict(self._carry.get(trial_id, {}))
        fresh = []
        for rec in records:
            if last is None or rec["step"] > last:
                if carry:
                    rec = {**rec, "metrics": {**carry, **rec["metrics"]}}
                    carry = {}
                fresh.append(rec)
                last = rec["step"]
            else:
                carry.update({k: v for k, v in rec["metrics"].items() if k.startswith("hparam/")})
        self._dropped += len(records) - len(fresh)

        def sent(step: int) -> None:  # advance as calls succeed, so a retry never re-sends a step
            self._last_step[trial_id] = step

        _log_metric_records(client, self._run_ids[trial_id], fresh, self.max_batch, sent)
        self._carry[trial_id] = carry

    def _do(self, client, op: tuple) -> None:
        kind = op[0]
        if kind == "parent":
            _, tags, params, artifacts = op
            self._experiment_id = _experiment_id(client, self.experiment, self.artifact_location)
            run = _find_parent(client, self._experiment_id, self.launch_id)
            if run is None:
                if self.resumed:
                    logger.warning("resume: no parent run with launch id %s; starting one", self.launch_id)
                run = _create_run(client, self._experiment_id, self.launch_id, {
                    **tags, "orchestra.launch_id": self.launch_id, "orchestra.run_type": "launch"})
                self._created.add(run.info.run_id)
                run_id = run.info.run_id
                _log_missing_params(client, run, params)
            elif run.info.run_id in self._created or self._resume_marked:  # retry after a partial attempt
                run_id = run.info.run_id
                _log_missing_params(client, run, params)
            else:
                run_id = run.info.run_id
                count = int(run.data.tags.get("orchestra.resumed", "0") or 0) + 1
                _set_tags(client, run_id, {**tags, "orchestra.resumed": str(count),
                                           "orchestra.resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                client.update_run(run_id, status="RUNNING")
                self._resume_marked = True
            _upload_named(client, run_id, artifacts)
            self._run_ids[None] = run_id
            self.parent_run_id = run_id
            self._parent_ready.set()
        elif kind == "child":
            _, trial_id, replay, params = op
            st = self._trials[trial_id]
            parent = self._run_ids[None]
            run = _find_child(client, self._experiment_id, parent, trial_id)
            if run is None:
                run = _create_run(client, self._experiment_id, st.name, {
                    **st.tags, "mlflow.parentRunId": parent, "orchestra.launch_id": self.launch_id,
                    "orchestra.run_type": "trial", "orchestra.trial_id": trial_id})
                self._run_ids[trial_id] = run.info.run_id
                self._last_step[trial_id] = None
            else:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                self._last_step[trial_id] = last_logged_step(run)
            # Only keys the run lacks (a creation cut short, here or by a killed driver): MLflow
            # refuses to change a param, and PBT may have changed the config since (so the params
            # are the ones the trial started with, snapshotted when the op was queued).
            _log_missing_params(client, run, params)
            self._run_ids[trial_id] = run.info.run_id
            if replay:
                self._send_metrics(client, trial_id, replay)
        elif kind == "reopen":
            run_id = self._run_ids.get(op[1])
            if run_id:
                client.update_run(run_id, status="RUNNING")
        elif kind == "metrics":
            self._send_metrics(client, op[1], [op[2]])
        elif kind == "artifacts":
            st = self._trials[op[1]]
            _upload_changed(client, self._run_ids[op[1]], st.artifact_dirs, st.uploaded)
        elif kind == "end":
            _, trial_id, status, tags = op
            run_id = self._run_ids[trial_id]
            _set_tags(client, run_id, tags)
            client.set_terminated(run_id, status=status)
        elif kind == "end_parent":
            client.set_terminated(self._run_ids[None], status=op[1])
        else:  # pragma: no cover - internal invariant
            raise AssertionError(kind)


def _upload_named(client, run_id: str, artifacts: Mapping[str, bytes]) -> None:
    if not artifacts:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in artifacts.items():
            p = Path(tmp, name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        client.log_artifacts(run_id, tmp)


_HASH_LIMIT = 4 << 20  # files up to this size are compared by content too


def _upload_changed(client, run_id: str, dirs: list[Path], uploaded: dict[str, tuple]) -> int:
    """Upload files under ``dirs`` that are new or changed (size, mtime, and CRC-32 of files up to
    4 MiB) since the last call.

    A file present in several dirs (the trial's working directory, Tune's staging copy and the
    storage copy, which Ray syncs only every ``sync_period``) is taken from the copy modified last,
    so a stale synced copy never shadows the file the trainable wrote most recently."""
    newest: dict[str, tuple[Path, tuple[int, int]]] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(d).as_posix()
            try:
                stat = p.stat()
            except FileNotFoundError:  # removed between listing and stat
                continue
            sig = (stat.st_size, stat.st_mtime_ns)
            if rel not in newest or sig[1] > newest[rel][1][1]:
                newest[rel] = (p, sig)
    n = 0
    for rel, (p, sig) in sorted(newest.items()):
        if sig[0] <= _HASH_LIMIT:  # a rewrite within one timestamp tick keeps size and mtime
            try:
                sig = (*sig, zlib.crc32(p.read_bytes()))
            except FileNotFoundError:
                continue
        if uploaded.get(rel) == sig:
            continue
        sub = posixpath.dirname(rel)
        client.log_artifact(run_id, str(p), artifact_path=sub or None)
        uploaded[rel] = sig
        n += 1
    return n


def _read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return out


# --------------------------------------------------------------------------- orchestra sync / ls
def sync_spool(path: str | Path, tracking_uri: str) -> int:
    """Send journals left by launches whose MLflow server was unreachable (``orchestra sync``).

    ``path`` is a journal file or a directory searched for ``mlflow_spool.jsonl``. For each trial the
    parent and child are found by tags (created if missing, with the journaled tags and params),
    metric records above the child's last logged step are sent, the trial's ``artifacts/`` folder next
    to the journal is uploaded, and recorded end statuses are applied. A fully sent journal is renamed
    to ``mlflow_spool.jsonl.synced``, so running sync twice sends nothing twice. Returns the number of
    metric points sent.
    """
    from orchestration.spec import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (a launch or trial folder holding {SPOOL_NAME} files, "
                        f"or one {SPOOL_NAME})")
    files = [path] if path.is_file() else sorted(path.rglob(SPOOL_NAME))
    client = _client(tracking_uri)
    sent = 0
    launches: set[tuple[str, str]] = set()  # (experiment id, parent run id)
    for file in files:
        records = _read_journal(file)
        headers = [r for r in records if r.get("type") == "trial"]
        if not headers:
            logger.warning("%s has no trial header; skipped", file)
            continue
        h = headers[-1]
        exp_id = _experiment_id(client, h["experiment"], h.get("artifact_location"))
        parent = _find_parent(client, exp_id, h["launch_id"])
        if parent is None:
            parent = _create_run(client, exp_id, h["launch_id"], {
                **h.get("launch_tags", {}), "orchestra.launch_id": h["launch_id"], "orchestra.run_type": "launch"})
        _log_missing_params(client, parent, h.get("launch_params", {}))
        parent_id = parent.info.run_id
        launches.add((exp_id, parent_id))
        child = _find_child(client, exp_id, parent_id, h["trial_id"])
        if child is None:
            child = _create_run(client, exp_id, h.get("name"), {
                **h.get("tags", {}), "mlflow.parentRunId": parent_id, "orchestra.launch_id": h["launch_id"],
                "orchestra.run_type": "trial", "orchestra.trial_id": h["trial_id"]})
            last = None
        else:
            last = last_logged_step(child)
        _log_missing_params(client, child, h.get("params", {}))
        run_id = child.info.run_id
        fresh = _above([r for r in records if r.get("type") == "metrics"], last)
        sent += _log_metric_records(client, run_id, fresh, MAX_METRICS_PER_BATCH)
        _upload_changed(client, run_id, [file.parent / "artifacts"], {})
        ends = [r for r in records if r.get("type") == "end"]
        if ends:
            _set_tags(client, run_id, ends[-1].get("tags", {}))
            client.set_terminated(run_id, status=ends[-1]["status"])
        shutil.move(str(file), str(file) + ".synced")
    # A launch whose end never reached MLflow ends once all its trials have: KILLED if any was,
    # else FAILED if any failed, else FINISHED (the callback's own rule).
    for exp_id, parent_id in sorted(launches):
        if client.get_run(parent_id).info.status != "RUNNING":
            continue
        kids = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = {_quote(parent_id)}")
        states = [k.info.status for k in kids]
        if states and "RUNNING" not in states:
            status = "KILLED" if "KILLED" in states else "FAILED" if "FAILED" in states else "FINISHED"
            client.set_terminated(parent_id, status=status)
    return sent


def _best(client, run, metric: str, mode: str) -> float | None:
    if metric not in run.data.metrics:
        return None
    values = [m.value for m in client.get_metric_history(run.info.run_id, metric)
              if not math.isnan(m.value)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def list_runs_table(tracking_uri: str, experiment: str | None = None) -> str:
    """A text table of experiments and their runs (``orchestra ls``): launches, then their trials
    indented, with status and the best value of the launch's metric (tags ``orchestra.metric`` and
    ``orchestra.mode`` on the parent; best = max or min over the trial's whole history)."""
    from mlflow.entities import ViewType

    client = _client(tracking_uri)
    if experiment is not None:
        experiments = [require_experiment(client, experiment, tracking_uri)]
    else:
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    rows = [("EXPERIMENT", "RUN", "RUN ID", "STATUS", "STARTED", "BEST")]
    for exp in sorted(experiments, key=lambda e: e.name):
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"],
                                  max_results=10000)
        parents = [r for r in runs if r.data.tags.get("orchestra.run_type") == "launch"]
        children: dict[str, list] = {}
        others = []
        for r in runs:
            pid = r.data.tags.get("mlflow.parentRunId")
            if r.data.tags.get("orchestra.run_type") == "launch":
                continue
            if pid:
                children.setdefault(pid, []).append(r)
            else:
                others.append(r)
        if not runs:
            rows.append((exp.name, "-", "-", "-", "-", "-"))
        for p in parents + others:
            metric = p.data.tags.get("orchestra.metric")
            mode = p.data.tags.get("orchestra.mode", "max")
            kids = children.get(p.info.run_id, [])
            bests = [(_best(client, k, metric, mode) if metric else None) for k in kids]
            found = [b for b in bests if b is not None]
            best = (max(found) if mode == "max" else min(found)) if found else None
            rows.append((exp.name, p.info.run_name or "", p.info.run_id, p.info.status,
                         _fmt_time(p.info.start_time), _fmt_best(metric, best)))
            for k, b in zip(kids, bests):
                rows.append(("", "  " + (k.info.run_name or ""), k.info.run_id, k.info.status,
                             _fmt_time(k.info.start_time), _fmt_best(metric, b)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _fmt_best(metric: str | None, value: float | None) -> str:
    return "-" if metric is None or value is None else f"{metric}={value:.6g}"
