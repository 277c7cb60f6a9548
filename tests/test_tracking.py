"""MLflow tracking callback: real Tune runs against a real SQLite store and a real `mlflow server`."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray import cloudpickle, tune

from orchestration.runs_table import list_runs_table
from orchestration.tracking import (
    SPOOL_NAME,
    MLflowTracking,
    changed_hparams,
    find_parent_run,
    flatten_params,
    metric_leaves,
    sanitize_key,
    sync_spool,
    throughput_metrics,
)
from orchestration.tracking.store import log_metric_records

# Ray workers cannot import this test module by name: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_STEPS = 6


def value(trial_index: int, step: int, attempt: int = 0) -> float:
    """What the toy trainable reports: unique per trial, step and attempt."""
    return trial_index * 100.0 + step + 0.5 + 1000.0 * attempt


def toy_trainable(config: dict) -> None:
    """Reports N_STEPS results with `steps` = 10 * i, writes artifacts, checkpoints every result.

    config: idx (trial index), fail_at (raise at this iteration unless a marker file exists),
    attempt_file (counts starts, so values differ per attempt).
    """
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["i"]
    attempt = 0
    if config.get("attempt_file"):
        f = Path(config["attempt_file"])
        attempt = int(f.read_text()) if f.exists() else 0
        f.write_text(str(attempt + 1))
    art = Path(tune.get_context().get_trial_dir()) / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    for i in range(start + 1, N_STEPS + 1):
        if i == config.get("fail_at") and not Path(config.get("marker", "/nonexistent")).exists():
            raise RuntimeError(f"toy failure at iteration {i}")
        (art / "curve.txt").write_text(f"up to {i}\n")
        if i == 2:
            (art / "plots").mkdir(exist_ok=True)
            (art / "plots" / "early.txt").write_text("early")
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"i": i}))
            tune.report(
                {
                    "steps": 10 * i,
                    "train": {"score": value(config["idx"], i, attempt), "flag": i % 2 == 0,
                              **({"lr": config["lr"]} if "lr" in config else {})},
                    "learner/loss": float("nan") if i == 3 else 1.0 / i,
                    "env": {"text": "not a number", "episode_return_mean": float(i)},
                    "other/ignored": 1.0,
                },
                checkpoint=tune.Checkpoint.from_directory(d),
            )


def flat_trainable(config: dict) -> None:
    toy_trainable({**config["cfg"], "seed": config.get("seed")})


def make_tuner(tmp_path, callback, configs, name="exp", extra_callbacks=None):
    return tune.Tuner(
        flat_trainable,
        param_space={"cfg": tune.grid_search(configs), "seed": 7, "nested": {"a": {"b": 2}}},
        run_config=tune.RunConfig(
            name=name, storage_path=str(tmp_path / "runs"), callbacks=[callback, *(extra_callbacks or [])],
            verbose=0,
        ),
    )


def children_by_idx(client: MlflowClient, parent) -> dict[int, object]:
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {int(r.data.params["cfg.idx"]): r for r in runs}


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- pure functions
def test_sanitize_key_gives_names_mlflow_accepts():
    assert sanitize_key("env/return (mean)") == "env/return _mean_"
    assert sanitize_key("/a//b/../c/") == "a/_/b/_/c"
    assert sanitize_key("x" * 300) == "x" * 250
    assert sanitize_key("lr:0@1") == "lr_0_1"


def test_flatten_params_joins_with_dots_and_respects_mlflow_limits():
    p = flatten_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "long": "y" * 7000, "bad key!": None})
    assert p == {"a.b": "1", "a.c.d": "[1, 2]", "long": "y" * 6000, "bad key_": "None"}


def test_metric_leaves_keeps_numeric_leaves_of_known_groups():
    result = {"train": {"x": 1, "ok": True, "s": "text", "nested": {"y": 2.5}}, "learner/nan": float("nan"),
              "other": {"z": 3}, "hparam/lr": 0.1, "steps": 10, "custom": {"k": 4}}
    m = metric_leaves(result, ["train", "learner", "hparam"])
    assert set(m) == {"train/x", "train/ok", "train/nested/y", "learner/nan", "hparam/lr"}
    assert m["train/ok"] == 1.0 and m["train/nested/y"] == 2.5 and math.isnan(m["learner/nan"])
    assert metric_leaves(result, ["custom"]) == {"custom/k": 4.0}


def test_throughput_metrics_hand_computed():
    flat = {"time_this_iter_s": 2.0, "steps": 500, "env/num_env_steps_sampled": 400,
            "learner/num_module_steps_trained": 1280, "learner/module_train_batch_size_mean": 128,
            "learners/__all_modules__/num_module_steps_trained": 99999}
    m = throughput_metrics(flat, prev_steps=100)
    # steps/s = (500-100)/2; env steps/s = 400/2; updates = 1280/128 = 10 minibatches in 2 s
    assert m == {"system/iteration_time_s": 2.0, "system/steps_per_s": 200.0,
                 "system/env_steps_per_s": 200.0, "system/updates_per_s": 5.0}
    assert throughput_metrics({"steps": 5}, 0) == {}


def test_changed_hparams_reports_numeric_mutations_only():
    old = flatten_params({"lr": 0.1, "opt": {"eps": 1e-3}, "name": "a", "n": 3})
    assert changed_hparams(old, {"lr": 0.2, "opt": {"eps": 1e-3}, "name": "b", "n": 3}) == {"hparam/lr": 0.2}


def test_error_text_keeps_the_end_of_the_traceback():
    from orchestration.tracking.store import MAX_ERROR_LENGTH, tail

    text = "Traceback\n" + "  frame\n" * 1000 + "RuntimeError: boom"
    out = tail(text, MAX_ERROR_LENGTH)
    assert len(out) <= MAX_ERROR_LENGTH and out.endswith("RuntimeError: boom") and out.startswith("[truncated]")


def test_log_metric_records_cuts_batches_at_record_boundaries(sqlite_uri):
    client = MlflowClient(sqlite_uri)
    run = client.create_run(client.create_experiment("batches"))
    records = [{"step": s, "ts": 1000 + s, "metrics": {f"m/{j}": s * 10.0 + j for j in range(n)}}
               for s, n in [(1, 2), (2, 2), (3, 5), (4, 1)]]
    done = []
    sent = log_metric_records(client, run.info.run_id, records, max_batch=3, on_sent=done.append)
    assert sent == 10
    # calls: [s1] (s2 would overflow), [s2], [s3 0..2] (split), [s3 3..4 + s4]
    assert done == [1, 2, 3, 4] or done == [1, 2, 4]
    assert history(client, run.info.run_id, "m/4") == [(3, 34.0)]
    assert history(client, run.info.run_id, "m/0") == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]


def test_artifact_upload_takes_the_newest_copy_and_sees_same_size_rewrites(sqlite_uri, tmp_path):
    from orchestration.tracking.store import upload_changed

    client = MlflowClient(sqlite_uri)
    rid = client.create_run(client.create_experiment("arts")).info.run_id
    storage, work = tmp_path / "storage" / "artifacts", tmp_path / "work" / "artifacts"
    for d, text, mtime in [(storage, "up to 2\n", 1_000), (work, "up to 6\n", 2_000)]:
        d.mkdir(parents=True)
        (d / "curve.txt").write_text(text)
        os.utime(d / "curve.txt", (mtime, mtime))  # the storage copy was synced earlier

    def fetched() -> str:
        return Path(client.download_artifacts(rid, "curve.txt", tempfile.mkdtemp())).read_text()

    uploaded: dict = {}
    assert upload_changed(client, rid, [storage, work], uploaded) == 1
    assert fetched() == "up to 6\n"
    assert upload_changed(client, rid, [storage, work], uploaded) == 0
    (work / "curve.txt").write_text("up to 7\n")  # same size, and the same mtime tick:
    os.utime(work / "curve.txt", (2_000, 2_000))
    assert upload_changed(client, rid, [storage, work], uploaded) == 1
    assert fetched() == "up to 7\n"


def test_callback_pickles_without_threads(sqlite_uri, tmp_path):
    cb = MLflowTracking(sqlite_uri, "pickled", "launch-p", flush_interval_s=0.2)
    cb.setup()
    assert cb.parent_run_id is not None and cb._delivery.thread.is_alive()
    clone = pickle.loads(pickle.dumps(cb))
    assert clone._delivery.thread is None and clone.parent_run_id is None and clone.launch_id == "launch-p"
    cb.on_experiment_end(trials=[])
    assert MlflowClient(sqlite_uri).get_run(cb.parent_run_id).info.status == "FINISHED"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_batch=5000"):
        MLflowTracking("sqlite:///x.db", "e", "l", max_batch=5000)
    cb = MLflowTracking("sqlite:///x.db", "e", "l", launch_artifacts={"spec.yaml": "/no/such/file"})
    with pytest.raises(FileNotFoundError, match="launch_artifacts\\['spec.yaml'\\]"):
        cb.setup()


# --------------------------------------------------------------------------- real Tune runs
def check_launch(uri: str, experiment: str, launch_id: str, n_ok: int, failing: set[int]):
    client = MlflowClient(uri)
    parent = find_parent_run(uri, experiment, launch_id)
    assert parent is not None
    exp = client.get_experiment(parent.info.experiment_id)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`orchestra.run_type` = 'launch'")
    assert len(parents) == 1
    assert parent.data.tags["orchestra.spec_hash"] == "abc123"
    assert parent.data.params["spec.lr"] == "0.1"
    assert parent.info.status == ("FAILED" if failing else "FINISHED")
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["spec.yaml"]
    kids = children_by_idx(client, parent)
    assert sorted(kids) == list(range(n_ok + len(failing)))
    for idx, run in kids.items():
        rid = run.info.run_id
        tags = run.data.tags
        assert tags["orchestra.algorithm"] == "toy" and tags["orchestra.spec_hash"] == "abc123"
        assert tags["orchestra.seed"] == "7" and tags["orchestra.trial_id"]
        assert run.data.params["nested.a.b"] == "2" and run.data.params["seed"] == "7"
        last = 2 if idx in failing else N_STEPS
        steps = [10 * i for i in range(1, last + 1)]
        assert history(client, rid, "train/score") == [(10 * i, value(idx, i)) for i in range(1, last + 1)]
        assert history(client, rid, "train/flag") == [(10 * i, float(i % 2 == 0)) for i in range(1, last + 1)]
        loss = dict(history(client, rid, "learner/loss"))
        assert sorted(loss) == steps and all(math.isnan(loss[s]) == (s == 30) for s in steps)
        assert [s for s, _ in history(client, rid, "system/iteration_time_s")] == steps
        assert [s for s, _ in history(client, rid, "system/steps_per_s")] == steps
        assert "other/ignored" not in run.data.metrics and "env/text" not in run.data.metrics
        files = {a.path for a in client.list_artifacts(rid)} | {
            a.path for a in client.list_artifacts(rid, "plots")}
        assert {"curve.txt", "plots/early.txt"} <= files
        local = Path(client.download_artifacts(rid, "curve.txt", str(Path(tempfile.mkdtemp()))))
        assert local.read_text() == f"up to {last}\n"
        if idx in failing:
            assert run.info.status == "FAILED"
            assert "toy failure at iteration 3" in tags["orchestra.error"]
        else:
            assert run.info.status == "FINISHED"
    return client, parent, kids


LAUNCH_KW = dict(
    launch_tags={"orchestra.spec_hash": "abc123", "orchestra.metric": "train/score", "orchestra.mode": "max"},
    launch_params={"spec": {"lr": 0.1}}, trial_tags={"orchestra.algorithm": "toy"},
)


def test_tune_run_logs_parent_children_metrics_artifacts_sqlite(ray_local, sqlite_uri, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: exp\n")
    cb = MLflowTracking(sqlite_uri, "toy-sqlite", "launch-1", artifact_location=str(tmp_path / "art"),
                        launch_artifacts={"spec.yaml": str(spec)}, flush_interval_s=0.5, **LAUNCH_KW)
    configs = [{"idx": 0}, {"idx": 1}, {"idx": 2, "fail_at": 3}]
    make_tuner(tmp_path, cb, configs).fit()
    client, parent, kids = check_launch(sqlite_uri, "toy-sqlite", "launch-1", 2, {2})
    assert client.get_experiment_by_name("toy-sqlite").artifact_location == str(tmp_path / "art")
    assert not list((tmp_path / "runs").rglob(SPOOL_NAME)), "delivered journals are removed"
    table = list_runs_table(sqlite_uri)
    assert "toy-sqlite" in table and "launch-1" in table and "FAILED" in table
    # best train/score of trial 1 (max over its history) and of the launch (max over trials)
    assert f"train/score={value(1, N_STEPS):.6g}" in table
    assert table.count("FINISHED") == 2
    with pytest.raises(ValueError, match="existing: Default, toy-sqlite$"):
        list_runs_table(sqlite_uri, "nope")


class ServerOutage(tune.Callback):
    """Stops the MLflow server in the driver's hook for the 2nd result, and starts it again (in a
    thread, so the driver goes on) once ``k`` more results have arrived while it is down: the outage
    is defined by results, not by seconds. A driver held by MLflow while the server is away would see
    no more results and so never bring it back: after ``deadline_s`` without them the server is started
    anyway (the test then fails, in bounded time, instead of hanging). Records the driver's thread."""

    def __init__(self, server, k: int, deadline_s: float):
        self.server, self.k, self.deadline_s = server, k, deadline_s
        self.results = 0
        self.during = 0  # results that arrived after the stop and before the restart began
        self.down = False
        self.enough = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.driver_threads: set[int] = set()

    def __getstate__(self) -> dict:  # Tune pickles callbacks into tuner.pkl; the server stays here
        return {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.driver_threads.add(threading.get_ident())
        self.results += 1
        if self.down:
            self.during += 1
            if self.during >= self.k:
                self.enough.set()
        elif self.thread is None and self.results == 2:
            self.server.stop()  # returns once the server process has exited
            self.down = True
            self.thread = threading.Thread(target=self._restart, daemon=True)
            self.thread.start()

    def _restart(self) -> None:
        self.enough.wait(timeout=self.deadline_s)
        self.down = False
        try:
            self.server.start()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


@pytest.mark.slow
def test_server_outage_does_not_block_trials_and_loses_nothing(ray_local, mlflow_server, tmp_path, monkeypatch):
    import requests

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: exp\n")
    cb = MLflowTracking(mlflow_server.uri, "toy-server", "launch-2", launch_artifacts={"spec.yaml": str(spec)},
                        flush_interval_s=0.3, retry_timeout_s=600, **LAUNCH_KW)
    k = 3  # of the 12 results left after the 2nd (trials 0 and 1: 6 each, trial 2: 2 before it fails)
    outage = ServerOutage(mlflow_server, k=k, deadline_s=600)
    # Which thread makes each HTTP request to the server: MLflow's client sends through requests.
    http_threads: list[tuple[int, str]] = []
    real_request = requests.Session.request

    def spy(self, method, url, *args, **kwargs):
        if str(url).startswith(mlflow_server.uri):
            http_threads.append((threading.get_ident(), threading.current_thread().name))
        return real_request(self, method, url, *args, **kwargs)

    configs = [{"idx": 0}, {"idx": 1}, {"idx": 2, "fail_at": 3}]
    with monkeypatch.context() as m:
        m.setattr(requests.Session, "request", spy)
        make_tuner(tmp_path, cb, configs, extra_callbacks=[outage]).fit()
    assert outage.thread is not None
    outage.thread.join(timeout=600)
    assert not outage.thread.is_alive() and outage.error is None, outage.error
    # Results kept arriving while the server was away: k of them, or the server would still be down
    # (restarted only by the deadline): the driver loop was never held by MLflow.
    assert outage.enough.is_set() and outage.during >= k, (outage.results, outage.during)
    # And no hook talked to MLflow: every request came from the callback's own thread.
    assert outage.driver_threads and http_threads
    assert not {ident for ident, _ in http_threads} & outage.driver_threads, sorted(set(http_threads))
    assert "mlflow-tracking" in {name for _, name in http_threads}
    check_launch(mlflow_server.uri, "toy-server", "launch-2", 2, {2})


def test_unreachable_server_spools_and_sync_uploads(ray_local, sqlite_uri, tmp_path):
    import conftest

    dead = f"http://127.0.0.1:{conftest.free_port()}"  # a port nobody listens on
    cb = MLflowTracking(dead, "toy-spool", "launch-3", flush_interval_s=0.2, retry_timeout_s=1.0, **LAUNCH_KW)
    make_tuner(tmp_path, cb, [{"idx": 0}, {"idx": 1}, {"idx": 2, "fail_at": 3}]).fit()
    assert cb.parent_run_id is None
    spools = sorted((tmp_path / "runs").rglob(SPOOL_NAME))
    assert len(spools) == 3
    n = sync_spool(tmp_path / "runs", sqlite_uri)
    # per successful trial: 6 steps x (score, flag, loss, env return, iteration time, steps/s);
    # the failing one reported 2 steps
    assert n == (2 * N_STEPS + 2) * 6
    assert sync_spool(tmp_path / "runs", sqlite_uri) == 0
    client = MlflowClient(sqlite_uri)
    parent = find_parent_run(sqlite_uri, "toy-spool", "launch-3")
    assert parent.data.tags["orchestra.spec_hash"] == "abc123" and parent.data.params["spec.lr"] == "0.1"
    assert parent.info.status == "FAILED"
    kids = children_by_idx(client, parent)
    for idx, run in kids.items():
        last = 2 if idx == 2 else N_STEPS
        assert history(client, run.info.run_id, "train/score") == [
            (10 * i, value(idx, i)) for i in range(1, last + 1)]
        assert run.info.status == ("FAILED" if idx == 2 else "FINISHED")
        assert "curve.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_resume_reuses_runs_and_never_logs_a_step_twice(ray_local, sqlite_uri, tmp_path):
    marker = tmp_path / "marker"
    attempts = tmp_path / "attempts"
    cb = MLflowTracking(sqlite_uri, "toy-resume", "launch-4", flush_interval_s=0.3, **LAUNCH_KW)
    cfg = {"idx": 0, "fail_at": 4, "marker": str(marker), "attempt_file": str(attempts)}
    make_tuner(tmp_path, cb, [cfg, {"idx": 1}], name="resume").fit()
    client = MlflowClient(sqlite_uri)
    parent = find_parent_run(sqlite_uri, "toy-resume", "launch-4")
    first = children_by_idx(client, parent)
    child, done = first[0], first[1]
    assert child.info.status == "FAILED" and done.info.status == "FINISHED"
    assert history(client, child.info.run_id, "train/score") == [(10 * i, value(0, i, 0)) for i in (1, 2, 3)]
    # Simulate a driver killed before delivering everything: step 40 of the failed trial, and step 70
    # plus the end of the finished trial, exist only in their journals.
    dirs = {p.name.split("_")[3]: p for p in (tmp_path / "runs" / "resume").glob("flat_trainable_*") if p.is_dir()}
    with open(dirs["00000"] / SPOOL_NAME, "w") as f:
        f.write(json.dumps({"type": "metrics", "trial_id": child.data.tags["orchestra.trial_id"],
                            "step": 40, "ts": 1, "metrics": {"train/score": -40.0}}) + "\n")
    client.update_run(done.info.run_id, status="RUNNING")
    with open(dirs["00001"] / SPOOL_NAME, "w") as f:
        tid = done.data.tags["orchestra.trial_id"]
        f.write(json.dumps({"type": "metrics", "trial_id": tid, "step": 70, "ts": 1,
                            "metrics": {"train/score": -70.0}}) + "\n")
        f.write(json.dumps({"type": "end", "trial_id": tid, "status": "FINISHED", "tags": {}}) + "\n")
    marker.write_text("fixed")
    # The restored Tuner carries the callback it pickled (resumed=False): the parent is found by tag.
    tuner = tune.Tuner.restore(str(tmp_path / "runs" / "resume"), flat_trainable, resume_errored=True)
    tuner.fit()
    parent = find_parent_run(sqlite_uri, "toy-resume", "launch-4")
    kids = children_by_idx(client, parent)
    assert sorted(kids) == [0, 1] and kids[0].info.run_id == child.info.run_id
    assert parent.data.tags["orchestra.resumed"] == "1" and parent.info.status == "FINISHED"
    assert kids[0].info.status == "FINISHED" and kids[1].info.status == "FINISHED"
    # steps 10-30 from the first attempt, 40 from the journal (the restarted trial re-reported step 40
    # from its checkpoint at step 30 and it was dropped), 50-60 from the second attempt
    assert history(client, child.info.run_id, "train/score") == (
        [(10 * i, value(0, i, 0)) for i in (1, 2, 3)] + [(40, -40.0)]
        + [(10 * i, value(0, i, 1)) for i in (5, 6)])
    assert [s for s, _ in history(client, child.info.run_id, "learner/loss")] == [10, 20, 30, 50, 60]
    assert history(client, done.info.run_id, "train/score") == (
        [(10 * i, value(1, i)) for i in range(1, N_STEPS + 1)] + [(70, -70.0)])


def pbt_trainable(config: dict) -> None:
    """Also records every lr it starts with (results replayed after an exploit may be dropped)."""
    log = Path(config["lr_log"]) / tune.get_context().get_trial_id()
    with open(log, "a") as f:
        f.write(f"{config['lr']!r}\n")
    toy_trainable({**config["cfg"], "seed": 0, "lr": config["lr"]})


def test_pbt_mutations_are_logged_as_hparam_metrics(ray_local, sqlite_uri, tmp_path):
    from ray.tune.schedulers import PopulationBasedTraining

    cb = MLflowTracking(sqlite_uri, "toy-pbt", "launch-5", flush_interval_s=0.3)
    lr_log = tmp_path / "lrs"
    lr_log.mkdir()
    # The exploit is driven by the scheduler, not by which trial runs faster: synch=True pauses each
    # trial at iterations 2, 4, 6 until both are there, then ranks them. With 2 trials and
    # quantile_fraction 0.5 each quantile holds ceil(2 * 0.5) = 1 trial, so at iteration 2 the lower
    # one (idx 0: score i + 0.5 against 100 + i + 0.5) exploits the upper one: it takes the upper
    # one's checkpoint of iteration 2 (the toy trainable reports one with every result, so PBT never
    # skips the exploit for lack of one) and its lr, perturbed. Asynchronous PBT would skip it when one
    # trial reaches the interval while the other has no score yet.
    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2, synch=True,
                                  hyperparam_mutations={"lr": tune.uniform(0.01, 1.0)}, quantile_fraction=0.5)
    grid = tune.Tuner(
        pbt_trainable,
        param_space={"cfg": tune.grid_search([{"idx": 0}, {"idx": 1}]), "lr": tune.uniform(0.01, 1.0),
                     "lr_log": str(lr_log)},
        tune_config=tune.TuneConfig(scheduler=pbt, metric="train/score", mode="max"),
        run_config=tune.RunConfig(name="pbt", storage_path=str(tmp_path / "runs"), callbacks=[cb], verbose=0),
    ).fit()
    client = MlflowClient(sqlite_uri)
    parent = find_parent_run(sqlite_uri, "toy-pbt", "launch-5")
    kids = {r.data.tags["orchestra.trial_id"]: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    # PBT's exploit copies the donor's whole config (cfg too) and last result (trial_id too), so
    # trials are told apart by their directory
    assert len(kids) == len(grid) == 2
    # two trials, quantile 0.5, synchronous: the worse one (idx 0) exploits the better one at iteration 2
    # and perturbs lr (x0.8 or x1.2, or resamples it)
    mutated = [t for t, run in kids.items() if "hparam/lr" in run.data.metrics]
    assert "0" in {kids[t].data.params["cfg.idx"] for t in mutated}, {
        t: (run.data.params["cfg.idx"], sorted(run.data.metrics)) for t, run in kids.items()}
    for i in mutated:
        rid = kids[i].info.run_id
        hist = [v for _, v in history(client, rid, "hparam/lr")]
        # Tune's scheduler mutates trial.config before callbacks see the result that triggered the
        # exploit, so a value is logged at that step and the trial restarts with it: every logged
        # value but the last (the trial may end before restarting) is an lr the trial started with.
        used = {float(x) for x in (lr_log / i).read_text().split()}
        assert all(any(v == pytest.approx(u) for u in used) for v in hist[:-1]), (hist, used)
        assert hist[0] != pytest.approx(float(kids[i].data.params["lr"]))
        steps = [s for s, _ in history(client, kids[i].info.run_id, "train/score")]
        assert steps == sorted(set(steps)), "steps strictly increasing even after exploit"
