"""The callback's delivery: a queue of MLflow operations and the one thread that sends it, in order.

The Tune driver only enqueues (:class:`orchestration.tracking.callback.MLflowTracking`); this thread is
the only place that talks to MLflow. Each queued operation is a small frozen record. Consecutive
:class:`LogMetrics` of one trial are sent in shared ``log_batch`` calls (<= ``max_batch`` metrics per
call). A failed call is retried until it succeeds when the error is transient (server unreachable,
overloaded, locked: :func:`~orchestration.tracking.store.is_transient`), with a backoff from
``flush_interval_s`` doubling up to ``max(5 s, flush_interval_s)``; an operation MLflow rejects is
logged and dropped.

Steps are strictly increasing per run: a result whose step is at or below the run's last logged step
is dropped (Tune restoring a trial from a checkpoint replays steps; MLflow cannot delete points). A PBT
exploit restarts a trial from an older checkpoint: the results it replays are dropped, but the
``hparam/`` values they carry (the mutation) move to the next result that is kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from orchestration.tracking.store import (
    experiment_id,
    find_or_create_child,
    find_or_create_parent,
    is_transient,
    last_logged_step,
    log_metric_records,
    log_missing_params,
    mlflow_client,
    set_tags,
    upload_changed,
    upload_named,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- queued operations
@dataclass(frozen=True)
class CreateParent:
    """Find the launch's parent run (then mark it resumed) or create it; upload the launch files."""

    tags: dict[str, str]
    params: dict[str, str]
    artifacts: dict[str, bytes]  # {artifact name: file content}
    trial_id: ClassVar[None] = None


@dataclass(frozen=True)
class CreateChild:
    """Find or create the trial's child run, then send journaled records above its last step."""

    trial_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]  # as the trial started (PBT may change the config later)
    replay: tuple[dict, ...]  # metric records an earlier driver of this launch journaled


@dataclass(frozen=True)
class ReopenChild:
    """A trial restarted after a failure or a PBT pause: its run is RUNNING again."""

    trial_id: str


@dataclass(frozen=True)
class LogMetrics:
    """One result's metrics: a journal record {"type": "metrics", "step", "ts", "metrics", ...}."""

    trial_id: str
    record: dict

    @property
    def count(self) -> int:
        return len(self.record["metrics"])


@dataclass(frozen=True)
class UploadArtifacts:
    """Upload files under the trial's ``artifacts/`` folders that changed since the last upload."""

    trial_id: str
    dirs: tuple[Path, ...]


@dataclass(frozen=True)
class EndChild:
    trial_id: str
    status: str  # FINISHED, FAILED or KILLED
    tags: dict[str, str]


@dataclass(frozen=True)
class EndParent:
    status: str
    trial_id: ClassVar[None] = None


Op = CreateParent | CreateChild | ReopenChild | LogMetrics | UploadArtifacts | EndChild | EndParent


def _count(op: Op) -> int:
    return op.count if isinstance(op, LogMetrics) else 0


# --------------------------------------------------------------------------- the queue and its thread
class Delivery:
    """Sends queued operations to MLflow from a background thread (see the module docstring).

    ``parent_ready`` is set once the parent run exists or the first attempt at it failed;
    ``parent_run_id`` is the parent's id once it exists.
    """

    def __init__(self, tracking_uri: str, experiment: str, launch_id: str, *,
                 artifact_location: str | None, resumed: bool, flush_interval_s: float, max_batch: int):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.launch_id = launch_id
        self.artifact_location = artifact_location
        self.resumed = resumed
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.parent_ready = threading.Event()
        self.parent_run_id: str | None = None
        self.thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._queue: deque[Op] = deque()
        self._queued_metrics = 0
        self._pending: Counter[str | None] = Counter()  # trial id (None = launch) -> undelivered ops
        self._stop = False
        self._flush_now = False
        # thread-side state
        self._experiment_id: str | None = None
        self._run_ids: dict[str | None, str] = {}  # trial id (None = parent) -> run id
        self._last_step: dict[str, int | None] = {}  # trial id -> last step sent
        self._carry: dict[str, dict[str, float]] = {}  # trial id -> hparam/ values of dropped results
        self._uploaded: dict[str, dict[str, tuple]] = {}  # trial id -> artifact signatures sent
        self._created: set[str] = set()  # runs this driver created (a retry must not count as resume)
        self._resume_marked = False
        self.dropped = 0  # metric records at or below their run's last step

    # ---- driver side
    def put(self, op: Op) -> None:
        with self._cond:
            self._pending[op.trial_id] += 1
            self._queue.append(op)
            self._queued_metrics += _count(op)
            if self._queued_metrics >= self.max_batch:
                self._flush_now = True
                self._cond.notify()

    def pending(self, trial_id: str | None) -> int:
        """Operations of ``trial_id`` (None: of the launch) not yet delivered."""
        with self._cond:
            return self._pending[trial_id]

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self._stop = False
            self.thread = threading.Thread(target=self._worker, name="mlflow-tracking", daemon=True)
            self.thread.start()

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

    def stop(self) -> None:
        """Stop the thread (waiting at most ``max(1, 2 * flush_interval_s)`` s); undelivered
        operations stay queued."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=max(1.0, 2 * self.flush_interval_s))

    # ---- thread side: the only place that talks to MLflow
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
                    client = mlflow_client(self.tracking_uri)
            except Exception as e:
                done, error = 0, e
            else:
                done, error = self._process(client, work)
            if error is None:
                backoff = self.flush_interval_s
            else:
                if not self.parent_ready.is_set():
                    self.parent_ready.set()
                if is_transient(error):
                    logger.debug("MLflow unreachable (%s); retrying in %.1fs", error, backoff)
                    self._ack(done)
                    with self._cond:
                        if self._stop and not self._flush_now:
                            return
                        self._cond.wait(timeout=backoff)
                    backoff = min(2 * backoff, max(5.0, self.flush_interval_s))
                    continue
                logger.warning("MLflow rejected %s: %s (dropped)", type(work[done]).__name__, error)
                done += 1
            self._ack(done)

    def _ack(self, n: int) -> None:
        with self._cond:
            for _ in range(n):
                op = self._queue.popleft()
                self._queued_metrics -= _count(op)
                self._pending[op.trial_id] -= 1
            self._cond.notify_all()

    def _process(self, client, work: list[Op]) -> tuple[int, Exception | None]:
        """Execute operations in order; consecutive metrics of one trial go in shared log_batch calls.
        Returns how many operations were completed and the error that stopped the rest (or None)."""
        i = 0
        try:
            while i < len(work):
                match work[i]:
                    case LogMetrics(trial_id=trial_id) as first:
                        j = i + 1
                        while (j < len(work) and isinstance(work[j], LogMetrics)
                               and work[j].trial_id == trial_id):
                            j += 1
                        # Send at most ~4 batches per group so acknowledgements stay fine-grained.
                        j = min(j, i + max(1, 4 * self.max_batch // max(1, first.count)))
                        self._send_metrics(client, trial_id, [w.record for w in work[i:j]])
                        i = j
                    case op:
                        self._do(client, op)
                        i += 1
        except Exception as e:
            return i, e
        return i, None

    def _do(self, client, op: Op) -> None:
        match op:
            case CreateParent():
                self._create_parent(client, op)
            case CreateChild():
                self._create_child(client, op)
            case ReopenChild(trial_id=trial_id):
                run_id = self._run_ids.get(trial_id)
                if run_id:
                    client.update_run(run_id, status="RUNNING")
            case LogMetrics(trial_id=trial_id, record=record):
                self._send_metrics(client, trial_id, [record])
            case UploadArtifacts(trial_id=trial_id, dirs=dirs):
                upload_changed(client, self._run_ids[trial_id], dirs, self._uploaded.setdefault(trial_id, {}))
            case EndChild(trial_id=trial_id, status=status, tags=tags):
                run_id = self._run_ids[trial_id]
                set_tags(client, run_id, tags)
                client.set_terminated(run_id, status=status)
            case EndParent(status=status):
                client.set_terminated(self._run_ids[None], status=status)
            case _:  # pragma: no cover - internal invariant
                raise AssertionError(op)

    def _create_parent(self, client, op: CreateParent) -> None:
        self._experiment_id = experiment_id(client, self.experiment, self.artifact_location)
        run, created = find_or_create_parent(client, self._experiment_id, self.launch_id, op.tags)
        run_id = run.info.run_id
        if created:
            if self.resumed:
                logger.warning("resume: no parent run with launch id %s; starting one", self.launch_id)
            self._created.add(run_id)
        if created or run_id in self._created or self._resume_marked:  # or a retry after a partial attempt
            log_missing_params(client, run, op.params)
        else:  # an earlier driver's parent: this launch resumes it
            count = int(run.data.tags.get("orchestra.resumed", "0") or 0) + 1
            set_tags(client, run_id, {**op.tags, "orchestra.resumed": str(count),
                                      "orchestra.resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            client.update_run(run_id, status="RUNNING")
            self._resume_marked = True
        upload_named(client, run_id, op.artifacts)
        self._run_ids[None] = run_id
        self.parent_run_id = run_id
        self.parent_ready.set()

    def _create_child(self, client, op: CreateChild) -> None:
        run, created = find_or_create_child(client, self._experiment_id, self._run_ids[None], self.launch_id,
                                            op.trial_id, op.name, op.tags)
        if not created and run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        self._run_ids[op.trial_id] = run.info.run_id
        self._last_step[op.trial_id] = None if created else last_logged_step(run)
        # Only keys the run lacks (a creation cut short, here or by a killed driver): MLflow refuses to
        # change a param, and PBT may have changed the config since (so the params are the ones the
        # trial started with, snapshotted when the operation was queued).
        log_missing_params(client, run, op.params)
        if op.replay:
            self._send_metrics(client, op.trial_id, list(op.replay))

    def _send_metrics(self, client, trial_id: str, records: list[dict]) -> None:
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
            else:  # replayed by a restore: dropped, its hparam/ values move to the next kept record
                carry.update({k: v for k, v in rec["metrics"].items() if k.startswith("hparam/")})
        self.dropped += len(records) - len(fresh)

        def sent(step: int) -> None:  # advance as calls succeed, so a retry never re-sends a step
            self._last_step[trial_id] = step

        log_metric_records(client, self._run_ids[trial_id], fresh, self.max_batch, sent)
        self._carry[trial_id] = carry
