"""The journal (spool) of a trial and ``orchestra sync``.

Every result the callback logs is first appended as one JSON line to the trial's journal
``<trial dir>/mlflow_spool.jsonl`` (``SPOOL_NAME``), before it is queued for MLflow. A journal holds
three kinds of records, one per line:

- ``{"type": "trial", "tracking_uri", "experiment", "artifact_location", "launch_id", "launch_tags",
  "launch_params", "trial_id", "name", "tags", "params"}``: written each time a driver opens the trial
  (the last one counts); enough to find or create the parent and child runs without the driver;
- ``{"type": "metrics", "trial_id", "step", "ts", "metrics": {key: value}}``: one result (``ts`` in
  milliseconds since the epoch);
- ``{"type": "end", "trial_id", "status", "tags"}``: the trial's end status and end tags.

Journals of trials whose data all reached MLflow are deleted at the end of the launch; the others stay,
and :func:`sync_spool` (``orchestra sync``) sends them once the server is back. A driver resuming the
launch replays its trials' journals above each child's last logged step.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from orchestration.tracking.store import (
    MAX_METRICS_PER_BATCH,
    experiment_id,
    find_or_create_child,
    find_or_create_parent,
    last_logged_step,
    log_metric_records,
    log_missing_params,
    mlflow_client,
    quote,
    set_tags,
    upload_changed,
)

logger = logging.getLogger(__name__)

SPOOL_NAME = "mlflow_spool.jsonl"


# --------------------------------------------------------------------------- records
def trial_record(*, tracking_uri: str, experiment: str, artifact_location: str | None, launch_id: str,
                 launch_tags: dict[str, str], launch_params: dict[str, str], trial_id: str, name: str,
                 tags: dict[str, str], params: dict[str, str]) -> dict[str, Any]:
    return {"type": "trial", "tracking_uri": tracking_uri, "experiment": experiment,
            "artifact_location": artifact_location, "launch_id": launch_id, "launch_tags": launch_tags,
            "launch_params": launch_params, "trial_id": trial_id, "name": name, "tags": tags,
            "params": params}


def metrics_record(trial_id: str, step: int, ts: int, metrics: dict[str, float]) -> dict[str, Any]:
    return {"type": "metrics", "trial_id": trial_id, "step": step, "ts": ts, "metrics": metrics}


def end_record(trial_id: str, status: str, tags: dict[str, str]) -> dict[str, Any]:
    return {"type": "end", "trial_id": trial_id, "status": status, "tags": tags}


def read_journal(path: Path) -> list[dict]:
    """The records of a journal; none if it does not exist, a line cut by a kill is skipped."""
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


class JournalWriter:
    """Appends records to journals, each file kept open (line-buffered) until :meth:`close`."""

    def __init__(self) -> None:
        self._files: dict[Path, IO[str]] = {}

    def append(self, path: Path, rec: dict) -> None:
        f = self._files.get(path)
        try:
            if f is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = self._files[path] = open(path, "a", buffering=1)
            f.write(json.dumps(rec) + "\n")
        except OSError as e:  # a full disk must not stop training; MLflow delivery still goes on
            logger.warning("cannot write MLflow journal %s: %s", path, e)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def above(records: Iterable[dict], last: int | None) -> list[dict]:
    """Metric records whose step is above ``last`` and above every earlier kept record's step."""
    fresh = []
    for rec in records:
        if last is None or rec["step"] > last:
            fresh.append(rec)
            last = rec["step"]
    return fresh


# --------------------------------------------------------------------------- orchestra sync
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
    client = mlflow_client(tracking_uri)
    sent = 0
    launches: set[tuple[str, str]] = set()  # (experiment id, parent run id)
    for file in files:
        records = read_journal(file)
        headers = [r for r in records if r.get("type") == "trial"]
        if not headers:
            logger.warning("%s has no trial header; skipped", file)
            continue
        h = headers[-1]
        exp_id = experiment_id(client, h["experiment"], h.get("artifact_location"))
        parent, _ = find_or_create_parent(client, exp_id, h["launch_id"], h.get("launch_tags", {}))
        log_missing_params(client, parent, h.get("launch_params", {}))
        parent_id = parent.info.run_id
        launches.add((exp_id, parent_id))
        child, created = find_or_create_child(client, exp_id, parent_id, h["launch_id"], h["trial_id"],
                                              h.get("name"), h.get("tags", {}))
        last = None if created else last_logged_step(child)
        log_missing_params(client, child, h.get("params", {}))
        run_id = child.info.run_id
        fresh = above([r for r in records if r.get("type") == "metrics"], last)
        sent += log_metric_records(client, run_id, fresh, MAX_METRICS_PER_BATCH)
        upload_changed(client, run_id, [file.parent / "artifacts"], {})
        ends = [r for r in records if r.get("type") == "end"]
        if ends:
            set_tags(client, run_id, ends[-1].get("tags", {}))
            client.set_terminated(run_id, status=ends[-1]["status"])
        shutil.move(str(file), str(file) + ".synced")
    # A launch whose end never reached MLflow ends once all its trials have: KILLED if any was,
    # else FAILED if any failed, else FINISHED (the callback's own rule).
    for exp_id, parent_id in sorted(launches):
        if client.get_run(parent_id).info.status != "RUNNING":
            continue
        kids = client.search_runs([exp_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = {quote(parent_id)}")
        states = [k.info.status for k in kids]
        if states and "RUNNING" not in states:
            status = "KILLED" if "KILLED" in states else "FAILED" if "FAILED" in states else "FINISHED"
            client.set_terminated(parent_id, status=status)
    return sent
