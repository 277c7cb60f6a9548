"""MLflow store access: experiments, find-or-create of the launch's parent run and each trial's child
run, batched params, tags and metrics, artifact uploads, and which errors are worth retrying.

Used by the callback's delivery thread (:mod:`orchestration.tracking.delivery`), by ``orchestra sync``
(:mod:`orchestration.tracking.spool`) and by ``orchestra ls``/``ui``/``report`` (experiment lookup).
"""

from __future__ import annotations

import posixpath
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

# MLflow's limits (mlflow.utils.validation): tag value length, params/tags per log_batch call, metrics
# per call; and how much of a trial's error text is kept in its ``orchestra.error`` tag.
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_ERROR_LENGTH = 4000

# MLflow 3's UI opens an experiment by its kind: untagged or GenAI experiments land on the GenAI
# overview / traces, ``custom_model_development`` on the runs table of the model-training view. The tag
# and value are the ones the UI's own "experiment type" selector writes (setExperimentTag).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# --------------------------------------------------------------------------- text and batching
def truncate(text: str, n: int) -> str:
    """The start of ``text``, at most ``n`` characters."""
    return text if len(text) <= n else text[: n - 20] + "\n...[truncated]"


def tail(text: str, n: int) -> str:
    """The end of a traceback, where the exception message is, at most ``n`` characters."""
    return text if len(text) <= n else "[truncated]...\n" + text[-(n - 20):]


def quote(value: str) -> str:
    """``value`` as a string literal of MLflow's search filter syntax."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def versions() -> dict[str, str]:
    """``orchestra.<pkg>_version`` tags of the packages a run's numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ray", "torch", "mlflow"):
        try:
            out[f"orchestra.{pkg}_version"] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- experiments
def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


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


def experiment_id(client, name: str, artifact_location: str | None, create: bool = True) -> str | None:
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


# --------------------------------------------------------------------------- runs
def _first_run(client, experiment_id: str, filter_string: str):
    runs = client.search_runs([experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


def find_parent_run(tracking_uri: str, experiment: str, launch_id: str):
    """The launch's parent run (an ``mlflow.entities.Run``), or None."""
    client = mlflow_client(tracking_uri)
    exp_id = experiment_id(client, experiment, None, create=False)
    return None if exp_id is None else _first_run(client, exp_id, _parent_filter(launch_id))


def _parent_filter(launch_id: str) -> str:
    return f"tags.`orchestra.launch_id` = {quote(launch_id)} and tags.`orchestra.run_type` = 'launch'"


def create_run(client, experiment_id: str, name: str | None, tags: Mapping[str, str]):
    """Create a run with all its tags in one request, so a run found by its tags is complete."""
    return client.create_run(experiment_id, run_name=name,
                             tags={k: truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()})


def find_or_create_parent(client, experiment_id: str, launch_id: str, tags: Mapping[str, str]):
    """The launch's parent run, found by its tags ``orchestra.launch_id`` and ``orchestra.run_type=launch``
    (the earliest if several) or created with ``tags`` plus those two. Returns (run, created)."""
    run = _first_run(client, experiment_id, _parent_filter(launch_id))
    if run is not None:
        return run, False
    run = create_run(client, experiment_id, launch_id,
                     {**tags, "orchestra.launch_id": launch_id, "orchestra.run_type": "launch"})
    return run, True


def find_or_create_child(client, experiment_id: str, parent_id: str, launch_id: str, trial_id: str,
                         name: str | None, tags: Mapping[str, str]):
    """The trial's child run, found by its tags ``mlflow.parentRunId`` and ``orchestra.trial_id`` (the
    earliest if several) or created with ``tags`` plus those, ``orchestra.launch_id`` and
    ``orchestra.run_type=trial``. Returns (run, created)."""
    run = _first_run(client, experiment_id, f"tags.`mlflow.parentRunId` = {quote(parent_id)} "
                                            f"and tags.`orchestra.trial_id` = {quote(trial_id)}")
    if run is not None:
        return run, False
    run = create_run(client, experiment_id, name, {
        **tags, "mlflow.parentRunId": parent_id, "orchestra.launch_id": launch_id,
        "orchestra.run_type": "trial", "orchestra.trial_id": trial_id})
    return run, True


def last_logged_step(run) -> int | None:
    """Largest step among a run's metrics. MLflow keeps, per key, the point with the largest
    (step, timestamp, value) as the key's latest value, so the maximum over latest values is the
    maximum over the whole history."""
    metrics = run.data.to_proto().metrics
    return max((int(m.step) for m in metrics), default=None)


def log_missing_params(client, run, params: Mapping[str, str]) -> None:
    """Log the params ``run`` lacks: MLflow refuses to change a param, and a creation cut short (by a
    kill or an outage) may have logged only some."""
    from mlflow.entities import Param

    have = run.data.params
    items = [Param(k, v) for k, v in params.items() if k not in have]
    for chunk in chunks(items, MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=chunk, synchronous=True)


def set_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, truncate(str(v), MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
    for chunk in chunks(items, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=chunk, synchronous=True)


def log_metric_records(client, run_id: str, records: list[dict], max_batch: int,
                       on_sent: Callable[[int], None] | None = None) -> int:
    """Send journal records ({"step", "ts", "metrics"}) in order, <= max_batch metrics per call.
    Calls are cut at record boundaries (a record with more than max_batch metrics is split alone),
    and ``on_sent(step)`` reports the last record fully sent after each call. Returns the number of
    metric points sent."""
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
        for chunk in chunks(metrics, max_batch):
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


def is_transient(exc: BaseException) -> bool:
    """Server unreachable, overloaded or locked: worth retrying. A request MLflow rejects (bad
    value, changed param, missing run) fails the same way again and is dropped instead."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in (
            "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
            "ENDPOINT_NOT_FOUND",
        )
    return isinstance(exc, OSError | TimeoutError | ConnectionError) or "Connection" in type(exc).__name__


# --------------------------------------------------------------------------- artifacts
def upload_named(client, run_id: str, artifacts: Mapping[str, bytes]) -> None:
    """Upload {artifact name: file content} to the run's artifact root."""
    if not artifacts:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in artifacts.items():
            p = Path(tmp, name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        client.log_artifacts(run_id, tmp)


_HASH_LIMIT = 4 << 20  # files up to this size are compared by content too


def upload_changed(client, run_id: str, dirs: Iterable[Path], uploaded: dict[str, tuple]) -> int:
    """Upload files under ``dirs`` that are new or changed (size, mtime, and CRC-32 of files up to
    4 MiB) since the last call; ``uploaded`` (relative path -> signature) carries what was sent.

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
