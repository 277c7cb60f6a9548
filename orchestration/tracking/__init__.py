"""MLflow tracking for Tune launches: one parent run per launch, one nested child run per trial.

The callback (:class:`MLflowTracking`) runs in the Tune driver. Trials never talk to MLflow; they
return numbers in their results and write files under ``<trial dir>/artifacts/``, and the callback
logs both. The parts:

- :mod:`~orchestration.tracking.metrics`: result -> metric names, values and steps, config -> params
  (pure functions; what is logged and its step semantics are in that module's docstring);
- :mod:`~orchestration.tracking.store`: MLflow store access (experiments, find-or-create of parent and
  child runs, batched logging, artifact uploads, transient errors), shared by the callback and sync;
- :mod:`~orchestration.tracking.callback`: the Tune hooks, which only journal and enqueue;
- :mod:`~orchestration.tracking.delivery`: the queued operations and the thread that sends them;
- :mod:`~orchestration.tracking.spool`: the per-trial journal and ``orchestra sync``.

Layout in MLflow
- one experiment per spec name (created with ``artifact_location`` when new);
- one parent run per launch, tagged ``orchestra.launch_id`` and ``orchestra.run_type=launch`` plus the
  launch tags (spec hash, git commit, command line), params = the flattened resolved spec, artifacts
  = the resolved spec and ``pip freeze``;
- one nested child run per trial (tag ``mlflow.parentRunId``), tagged ``orchestra.trial_id``,
  ``orchestra.seed``, ``orchestra.run_type=trial``, the launch tags and the trial tags (algorithm,
  env or task); params = the flattened trial config;
- a packed trial (spec ``pack_seeds``, config ``seed`` a list) has no child run of its own: each of its
  seeds gets one, as an unpacked trial of that seed would (params with its seed, tag ``orchestra.seed``,
  its metrics from the trial result's ``replicas[<seed>]`` at that replica's steps, journal
  ``<trial dir>/seed<s>/mlflow_spool.jsonl``), named ``<trial name>_seed<s>`` and tagged
  ``orchestra.trial_id=<trial id>-seed<s>``, ``orchestra.pack`` (the trial id), ``orchestra.pack_name``,
  ``orchestra.pack_seeds``. A replica reported ``{"failed": reason}`` ends FAILED alone.

Metrics
Each result is flattened with ``/``; numeric leaves in the metric groups (``METRIC_GROUPS`` plus
``extra_metric_prefixes``) are logged with step ``result["steps"]`` (fallback ``training_iteration``),
NaN and +-inf included; the callback adds ``system/`` throughput and ``hparam/`` mutations
(definitions in :mod:`~orchestration.tracking.metrics`).

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

from orchestration.tracking.callback import DEFAULT_RETRY_TIMEOUT_S, RETRY_TIMEOUT_ENV, MLflowTracking
from orchestration.tracking.metrics import (
    METRIC_GROUPS,
    as_number,
    changed_hparams,
    flatten,
    flatten_params,
    metric_leaves,
    result_step,
    sanitize_key,
    throughput_metrics,
)
from orchestration.tracking.spool import SPOOL_NAME, sync_spool
from orchestration.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MAX_ERROR_LENGTH,
    MAX_METRICS_PER_BATCH,
    find_parent_run,
    last_logged_step,
    mark_training_experiment,
    require_experiment,
)

__all__ = [
    "DEFAULT_RETRY_TIMEOUT_S", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "MAX_ERROR_LENGTH",
    "MAX_METRICS_PER_BATCH", "METRIC_GROUPS", "RETRY_TIMEOUT_ENV", "SPOOL_NAME", "MLflowTracking",
    "as_number", "changed_hparams", "find_parent_run", "flatten", "flatten_params", "last_logged_step",
    "mark_training_experiment", "metric_leaves", "require_experiment", "result_step", "sanitize_key",
    "sync_spool", "throughput_metrics",
]
