"""The Tune callback: runs in the Tune driver, journals each result and enqueues it for MLflow.

The driver only journals (:mod:`orchestration.tracking.spool`) and enqueues
(:mod:`orchestration.tracking.delivery`); it never waits on MLflow except in :meth:`setup` (until the
parent run exists or the first attempt failed) and at experiment end (at most ``retry_timeout_s``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Callback

from orchestration.tracking.delivery import (
    CreateChild,
    CreateParent,
    Delivery,
    EndChild,
    EndParent,
    LogMetrics,
    ReopenChild,
    UploadArtifacts,
)
from orchestration.tracking.metrics import (
    METRIC_GROUPS,
    changed_hparams,
    flatten,
    flatten_params,
    metric_leaves,
    result_step,
    throughput_metrics,
)
from orchestration.tracking.spool import (
    SPOOL_NAME,
    JournalWriter,
    end_record,
    metrics_record,
    read_journal,
    trial_record,
)
from orchestration.tracking.store import MAX_ERROR_LENGTH, MAX_METRICS_PER_BATCH, tail, versions

logger = logging.getLogger(__name__)

RETRY_TIMEOUT_ENV = "ORCHESTRA_MLFLOW_RETRY_TIMEOUT_S"
DEFAULT_RETRY_TIMEOUT_S = 30.0


@dataclass
class _TrialState:
    """Driver-side bookkeeping for one trial (rebuilt from MLflow and the journal on resume)."""

    trial_id: str
    name: str
    journal: Path
    params: dict[str, str]
    tags: dict[str, str]
    artifact_dirs: tuple[Path, ...]
    prev_steps: float | None = None
    done: bool = False
    node_ips: set[str] = field(default_factory=set)  # nodes the trial reported from (multi-node runs)
    final: bool = False  # a replica of a packed trial that failed alone: never reopened


REPLICAS_KEY = "replicas"
"""A packed trial's per-replica results ({seed: result}; orchestration.trainables.replica_result)."""
FAILED_KEY = "failed"


def _units(trial) -> list[int | None]:
    """What gets a child run: [None] for a trial, its seeds for a packed trial (config ``seed`` a list)."""
    seed = (trial.config or {}).get("seed")
    return [int(s) for s in seed] if isinstance(seed, list | tuple) else [None]


def _unit_id(trial, seed: int | None) -> str:
    """The ``orchestra.trial_id`` of a trial's child run: the trial id, ``<trial id>-seed<s>`` for a replica."""
    return trial.trial_id if seed is None else f"{trial.trial_id}-seed{seed}"


class MLflowTracking(Callback):
    """Tune callback logging a launch to MLflow (see :mod:`orchestration.tracking` for the contract).

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
        self._init_runtime()

    # ---- pickling: Tune pickles callbacks with the run config; threads, locks, files stay behind
    def _init_runtime(self) -> None:
        self._delivery = Delivery(self.tracking_uri, self.experiment, self.launch_id,
                                  artifact_location=self.artifact_location, resumed=self.resumed,
                                  flush_interval_s=self.flush_interval_s, max_batch=self.max_batch)
        self._journals = JournalWriter()
        self._trials: dict[str, _TrialState] = {}
        self._adopted = False
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
        self._init_runtime()

    @property
    def parent_run_id(self) -> str | None:
        """The launch's parent run id, once the delivery thread has found or created it."""
        return self._delivery.parent_run_id

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
        tags = {**versions(), **self.launch_tags}
        self._delivery.put(CreateParent(tags, flatten_params(self.launch_params), artifacts))
        self._delivery.start()
        # Wait until the parent exists (so `parent_run_id` is set for callers) or the first attempt
        # failed: a slow store is waited for, an unreachable one is not.
        self._delivery.parent_ready.wait(timeout=self.retry_timeout_s)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._adopted:
            return
        self._adopted = True
        # A trial that finished before an earlier driver of this launch was killed is not started
        # again, but its journal may hold results and the end status that never reached MLflow.
        for trial in trials:
            if trial.trial_id in self._trials or trial.status not in ("TERMINATED", "ERROR"):
                continue
            for seed in _units(trial):
                journal = self._journal_path(trial, seed)
                if not journal.exists() or _unit_id(trial, seed) in self._trials:
                    continue
                ends = [r for r in read_journal(journal) if r.get("type") == "end"]
                st = self._open_unit(trial, seed)
                if ends:
                    self._end_unit(st, ends[-1]["status"], None, tags=ends[-1].get("tags"))
                else:
                    self._end_unit(st, "FINISHED" if trial.status == "TERMINATED" else "FAILED", None)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._open_trial(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        replicas = result.get(REPLICAS_KEY)
        if _units(trial) == [None] or not isinstance(replicas, dict):
            st = self._trials.get(trial.trial_id) or self._open_unit(trial, None)
            self._log_result(st, trial.config, result)
            return
        # A packed trial: each replica's result goes to its own child run, as an unpacked trial's would.
        counters = {k: result[k] for k in ("training_iteration", "time_this_iter_s", "node_ip") if k in result}
        for seed, rep in replicas.items():
            st = self._trials.get(_unit_id(trial, int(seed))) or self._open_unit(trial, int(seed))
            if st.done:
                continue
            if FAILED_KEY in rep:  # this replica stopped (non-finite loss); the pack goes on
                self._end_unit(st, "FAILED", str(rep[FAILED_KEY]))
                st.final = True
                continue
            self._log_result(st, {**trial.config, "seed": int(seed)}, {**rep, **counters})

    def _log_result(self, st: _TrialState, config: dict, result: dict) -> None:
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
        new_params = flatten_params(config)
        metrics.update(changed_hparams(st.params, config))
        st.params.update({k: v for k, v in new_params.items() if k in st.params})
        if not metrics:
            return
        rec = metrics_record(st.trial_id, step, int(time.time() * 1000), metrics)
        self._journals.append(st.journal, rec)
        self._delivery.put(LogMetrics(st.trial_id, rec))

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        for seed in _units(trial):
            st = self._trials.get(_unit_id(trial, seed))
            if st is not None:
                self._delivery.put(UploadArtifacts(st.trial_id, st.artifact_dirs))

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
            for seed in _units(trial):
                st = self._trials.get(_unit_id(trial, seed))
                if st is not None and not st.done:
                    self._killed_launch = True
                    self._end_unit(st, "KILLED", None)
        statuses = [t.status for t in trials]
        if self._killed_launch:
            status = "KILLED"
        elif any(s == "ERROR" for s in statuses):
            status = "FAILED"
        else:
            status = "FINISHED"
        self._delivery.put(EndParent(status))
        self.close(self.retry_timeout_s)

    def get_state(self) -> dict | None:
        return None  # everything needed to continue is in MLflow and the journals

    # ---- driver-side helpers
    def _journal_path(self, trial, seed: int | None = None) -> Path:
        """``<trial dir>/mlflow_spool.jsonl``; a packed trial's replica journals in ``<trial dir>/seed<s>/``."""
        sub = () if seed is None else (f"seed{seed}",)
        try:
            local = trial.storage.storage_filesystem.type_name == "local"
        except Exception:
            local = False
        if local and trial.path:
            return Path(trial.path, *sub) / SPOOL_NAME
        base = Path(self.spool_dir) if self.spool_dir else Path(trial.local_path or ".")
        if self.spool_dir:
            base = base / (trial.storage.trial_dir_name or trial.trial_id)
        return Path(base, *sub) / SPOOL_NAME

    @staticmethod
    def _artifact_dirs(trial) -> tuple[Path, ...]:
        dirs: list[Path] = []
        candidates = [getattr(trial, "path", None), getattr(trial, "local_path", None)]
        try:
            candidates.append(trial.storage.trial_working_directory)
        except Exception:
            pass
        for c in candidates:
            if c and Path(c, "artifacts") not in dirs:
                dirs.append(Path(c, "artifacts"))
        return tuple(dirs)

    def _open_trial(self, trial) -> None:
        """Open the trial's child run, or each replica's of a packed trial."""
        for seed in _units(trial):
            self._open_unit(trial, seed)

    def _open_unit(self, trial, seed: int | None) -> _TrialState:
        """The child run of a trial (``seed`` None) or of one replica of a packed trial: the replica's run has
        the params, seed tag and name pattern of an unpacked trial of its seed, plus ``orchestra.pack``."""
        key = _unit_id(trial, seed)
        if key in self._trials:  # restarted after a failure or a PBT pause
            st = self._trials[key]
            if st.done and not st.final:
                st.done = False
                self._delivery.put(ReopenChild(st.trial_id))
            return st
        config = dict(trial.config)
        name = str(trial)
        pack_tags = {}
        if seed is not None:
            pack_tags = {"orchestra.pack": trial.trial_id, "orchestra.pack_name": name,
                         "orchestra.pack_seeds": ",".join(str(s) for s in config["seed"])}
            config["seed"], name = seed, f"{trial}_seed{seed}"
        params = flatten_params(config)
        tags = {**versions(), **self.launch_tags, **self.trial_tags,
                "orchestra.trial_id": key, "orchestra.trial_name": name, **pack_tags}
        if "seed" in config:
            tags["orchestra.seed"] = str(config["seed"])
        if isinstance(config.get("env"), str):  # the env may be a search dimension
            tags["orchestra.env"] = config["env"]
        st = _TrialState(key, name, self._journal_path(trial, seed), params, tags, self._artifact_dirs(trial))
        self._trials[key] = st
        # Records journaled by an earlier driver of this launch (killed, or server unreachable):
        # replayed above the child's last logged step once the child is found.
        replay = tuple(r for r in read_journal(st.journal) if r.get("type") == "metrics")
        self._journals.append(st.journal, trial_record(
            tracking_uri=self.tracking_uri, experiment=self.experiment,
            artifact_location=self.artifact_location, launch_id=self.launch_id,
            launch_tags={**versions(), **self.launch_tags}, launch_params=flatten_params(self.launch_params),
            trial_id=key, name=st.name, tags=tags, params=params))
        self._delivery.put(CreateChild(st.trial_id, st.name, tags, dict(params), replay))  # params as started
        return st

    def _end_trial(self, trial, status: str, error: str | None, tags: dict | None = None) -> None:
        """End the trial's child run, or every open replica's of a packed trial."""
        for seed in _units(trial):
            st = self._trials.get(_unit_id(trial, seed))
            if st is not None:
                self._end_unit(st, status, error, tags)

    def _end_unit(self, st: _TrialState, status: str, error: str | None, tags: dict | None = None) -> None:
        if st.done:
            return
        st.done = True
        tags = {**(tags or {}), "orchestra.status": status}
        if st.node_ips:  # every node the trial ran on, e.g. before and after a node failure
            tags["orchestra.node_ips"] = ",".join(sorted(st.node_ips))
        if error:
            tags["orchestra.error"] = tail(error, MAX_ERROR_LENGTH)
        self._delivery.put(UploadArtifacts(st.trial_id, st.artifact_dirs))
        self._journals.append(st.journal, end_record(st.trial_id, status, tags))
        self._delivery.put(EndChild(st.trial_id, status, tags))

    def flush(self, timeout: float | None = None) -> bool:
        """Ask the thread to send now and wait (at most ``timeout`` s) until the queue is empty."""
        return self._delivery.flush(timeout)

    def close(self, timeout: float) -> None:
        """Deliver what can be delivered within ``timeout`` s, stop the thread, keep the journals of
        trials with undelivered data (for ``orchestra sync``) and delete the others."""
        delivered = self._delivery.flush(timeout)
        self._delivery.stop()
        self._journals.close()
        # Launch-level data undelivered: sync needs every journal's header.
        keep_all = self._delivery.pending(None) > 0
        kept = []
        for st in self._trials.values():
            if self._delivery.pending(st.trial_id) == 0 and not keep_all:
                st.journal.unlink(missing_ok=True)
            else:
                kept.append(str(st.journal))
        if kept or not delivered:
            logger.warning(
                "MLflow at %s did not take everything within %.0fs; unsent data kept in %s - "
                "send it later with `orchestra sync`", self.tracking_uri, timeout, kept or "(launch data)",
            )
