"""End-to-end launches through orchestration.run with real Ray Tune, RLlib and MLflow."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import conftest
import pytest
from mlflow import MlflowClient

from orchestration.runner import run

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRA = [sys.executable, "-m", "orchestration.cli"]


def tracking(tmp_path: Path, uri: str | None = None) -> dict:
    return {"uri": uri or f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "artifacts"),
            "storage": str(tmp_path / "runs")}


def runs_of(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("orchestra.run_type") == "launch"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_ppo_and_task_sweeps_land_in_sqlite_mlflow(ray_local, tmp_path: Path):
    t = tracking(tmp_path)
    ppo = run({
        "name": "e2e_ppo", "algorithm": "PPO", "env": "CartPole-v1",
        "config": {"lr": {"grid": [1e-3, 3e-4]}, "train_batch_size_per_learner": 200, "minibatch_size": 100,
                   "num_epochs": 1, "num_env_runners": 0},
        "seeds": [0], "stop": {"training_iteration": 2}, "tracking": t,
    })
    task = run({
        "name": "e2e_task", "task": "regression_demo", "config": {"write_weights": True},
        "seeds": [0, 1], "stop": {"training_iteration": 3}, "metric": "train/loss", "mode": "min", "tracking": t,
    })
    assert ppo.num_errors == 0 and task.num_errors == 0 and len(ppo.trials) + len(task.trials) == 4

    client, parents, children = runs_of(t["uri"], "e2e_ppo")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["orchestra.launch_id"] == ppo.launch
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"spec.resolved.yaml", "pip-freeze.txt"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["orchestra.algorithm"] == "PPO"
        assert child.data.params["lr"] in ("0.001", "0.0003") and child.data.params["seed"] == "0"
        # step = env steps sampled: 200 per iteration
        assert steps_of(client, child.info.run_id, "env/episode_return_mean") == [200, 400]
        assert steps_of(client, child.info.run_id, "learner/total_loss") == [200, 400]
        assert "system/env_steps_per_s" in child.data.metrics
    assert {c.data.params["lr"] for c in children} == {"0.001", "0.0003"}

    client, parents, children = runs_of(t["uri"], "e2e_task")
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["orchestra.seed"] for c in children} == {"0", "1"}
    for child in children:
        assert steps_of(client, child.info.run_id, "train/loss") == [20, 40, 60]
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert history[-1].value < history[0].value  # it learns
        assert "weights.csv" in {a.path for a in client.list_artifacts(child.info.run_id)}


def test_task_sweep_against_real_mlflow_server(ray_local, tmp_path: Path, mlflow_server):
    t = tracking(tmp_path, uri=mlflow_server.uri)
    out = run({"name": "e2e_server", "task": "regression_demo", "config": {"lr": {"grid": [0.05, 0.1]}},
               "seeds": [0, 1], "stop": {"training_iteration": 3}, "tracking": t})
    assert out.num_errors == 0
    client, parents, children = runs_of(mlflow_server.uri, "e2e_server")
    assert len(parents) == 1 and len(children) == 4
    assert {(c.data.params["lr"], c.data.params["seed"]) for c in children} == {
        (lr, s) for lr in ("0.05", "0.1") for s in ("0", "1")}
    for child in children:
        assert steps_of(client, child.info.run_id, "train/loss") == [20, 40, 60]


def test_failures_and_non_finite_losses_are_marked(ray_local, tmp_path: Path):
    t = tracking(tmp_path)
    out = run({"name": "e2e_fail", "task": "regression_demo",
               "config": {"fail_at_step": {"grid": [None, 60]}, "lr": 0.05},
               "seeds": [0], "stop": {"training_iteration": 4}, "failure": {"max_retries": 1},
               "checkpoint": {"frequency": 1}, "tracking": t})
    assert out.num_errors == 1
    client, _, children = runs_of(t["uri"], "e2e_fail")
    by_status = {c.info.status: c for c in children}
    assert set(by_status) == {"FINISHED", "FAILED"}
    failed = by_status["FAILED"]
    assert "fail_at_step=60" in failed.data.tags["orchestra.error"]
    # retried from its checkpoint: the history holds each step once
    assert steps_of(client, failed.info.run_id, "train/loss") == [20, 40, 60]
    assert steps_of(client, by_status["FINISHED"].info.run_id, "train/loss") == [20, 40, 60, 80]

    out = run({"name": "e2e_nan", "task": "regression_demo", "config": {"lr": 50.0},
               "seeds": [0], "stop": {"training_iteration": 20}, "tracking": t})
    assert out.num_errors == 1 and "trial stopped" in out.trials[0]["error"]
    client, _, children = runs_of(t["uri"], "e2e_nan")
    assert children[0].info.status == "FAILED"
    assert "train/loss is" in children[0].data.tags["orchestra.error"]


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _orchestra(args: list[str], cwd: Path, stdout=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(ORCHESTRA + args, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _group_states(pgid: int) -> list[str]:
    """Process states (R, S, T, ...) of every process in process group ``pgid``."""
    states = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            states.append(fields[0])
    return states


def _gated_task(cwd: Path) -> None:
    """tests/gated_task.py in the launch's working dir, where the driver and its workers import it."""
    shutil.copy(Path(__file__).with_name("gated_task.py"), cwd / "gated_task.py")


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_runs(tmp_path: Path):
    import json

    from algorithms.ray_compat import training_run_metadata

    # The trials wait before iteration 6 until `release` exists: the driver is killed while both are
    # still running whatever their speed (the test creates the file only for the resume).
    _gated_task(tmp_path)
    release = tmp_path / "release"
    spec = _write(tmp_path / "resume.yaml", f"""
        name: e2e_resume
        task: gated_regression
        imports: [gated_task]
        config: {{steps_per_iteration: 400, batch_size: 256, dim: 64, lr: 0.01, gate_iteration: 6,
                  gate_file: "{release}"}}
        seeds: [0, 1]
        stop: {{training_iteration: 25}}
        checkpoint: {{frequency: 1, keep: 2}}
    """)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with open(tmp_path / "first-driver.log", "w") as log:  # a pipe nobody reads could fill and block it
        proc = _orchestra(["run", str(spec), "--num-cpus", "2"], cwd=tmp_path, stdout=log)

    def latest_checkpoints() -> list:
        """Each trial's latest checkpoint as named by the newest experiment state (None: none yet)."""
        states = list((tmp_path / "runs").glob("*/experiment_state-*.json"))
        if not states:
            return []
        state = max(states, key=lambda f: f.stat().st_mtime)
        return [training_run_metadata(runtime).checkpoint_manager.latest_checkpoint_result
                for _, runtime in json.loads(state.read_text())["trial_data"]]

    def progressed() -> bool:
        try:
            client, _, children = runs_of(uri, "e2e_resume")
            logged = len(children) == 2 and all(
                len(steps_of(client, c.info.run_id, "train/loss")) >= 4 for c in children)
            latest = latest_checkpoints()
        except Exception:  # noqa: BLE001 - the store or the state may not exist yet (or be mid-write)
            return False
        # ... and Tune's experiment state names a checkpoint of each trial (it is saved periodically)
        return logged and len(latest) == 2 and all(r is not None for r in latest)

    def frozen_with_checkpoints() -> bool:
        """Stop the driver's process group; keep it stopped if the state on disk (written by plain
        copies, so a kill at a random moment could cut it short) parses and names checkpoints, else let
        it run on and poll again. The kill then finds the files exactly as checked."""
        os.killpg(proc.pid, signal.SIGSTOP)
        conftest.wait_for(lambda: all(st in "TtZX" for st in _group_states(proc.pid)), 120, "the driver's group stopped")
        try:
            latest = latest_checkpoints()
            if len(latest) == 2 and all(r is not None for r in latest):
                return True
        except Exception:  # noqa: BLE001 - caught mid-write
            pass
        os.killpg(proc.pid, signal.SIGCONT)
        return False

    try:
        conftest.wait_for(progressed, 900, "both trials logged 4 iterations and the experiment state names checkpoints")
        conftest.wait_for(frozen_with_checkpoints, 300, "a complete experiment state with the driver stopped")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait(60)
    client, parents, children = runs_of(uri, "e2e_resume")
    assert all(len(steps_of(client, c.info.run_id, "train/loss")) <= 5 for c in children), "passed the gate"

    launch = next((tmp_path / "runs").iterdir()).name
    # What a kill between Tune's checkpoint pruning and its experiment-state snapshot leaves: the state names
    # checkpoints that are gone. Delete the one each trial's latest state names; resume must fall back.
    latest = latest_checkpoints()
    assert len(latest) == 2 and all(r is not None for r in latest), latest
    for r in latest:
        shutil.rmtree(r.checkpoint.path, ignore_errors=True)
    release.write_text("go")
    resumed = _orchestra(["resume", launch, "--num-cpus", "2"], cwd=tmp_path)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    # a trial's warning is in its stderr file (on the console only with --verbose)
    trial_logs = "".join(f.read_text() for f in (tmp_path / "runs" / launch).glob("*/stderr"))
    assert "no longer exists (pruned after the experiment state was saved)" in trial_logs

    client, parents, children = runs_of(uri, "e2e_resume")
    assert len(parents) == 1 and len(children) == 2, "resume must reuse the launch's runs"
    assert "orchestra.resumed" in parents[0].data.tags
    for child in children:
        assert child.info.status == "FINISHED"
        steps = steps_of(client, child.info.run_id, "train/loss")
        assert steps == [400 * i for i in range(1, 26)], steps  # strictly increasing, gap-free, once each


@pytest.mark.slow
def test_imports_register_user_env_and_diagnostic_in_workers(tmp_path: Path):
    _write(tmp_path / "userpkg_e2e.py", """
        import gymnasium as gym
        import numpy as np
        from pydantic import BaseModel
        from ray.rllib.callbacks.callbacks import RLlibCallback

        from algorithms.diagnostics.registry import register_diagnostic


        class FiveStepEnv(gym.Env):
            \"\"\"Reward 1 per step, always 5 steps: every episode returns exactly 5.\"\"\"
            observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
            action_space = gym.spaces.Discrete(2)

            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.t = 0
                return np.zeros(2, np.float32), {}

            def step(self, action):
                self.t += 1
                return np.zeros(2, np.float32), 1.0, self.t >= 5, False, {}


        gym.register("UserFiveStep-v0", entry_point=FiveStepEnv)


        class CountSettings(BaseModel):
            every: int = 1


        def make_callback(settings):
            class CountCallback(RLlibCallback):
                calls = 0

                def on_train_result(self, *, algorithm, metrics_logger=None, result, **kwargs):
                    type(self).calls += 1
                    if type(self).calls % settings.every == 0:
                        result.setdefault("convergence", {})["test_diag_calls"] = float(type(self).calls)
            return CountCallback


        register_diagnostic("test_count", CountSettings, rllib_callback=make_callback)
    """)
    spec = _write(tmp_path / "user.yaml", """
        name: e2e_imports
        algorithm: PPO
        env: UserFiveStep-v0
        imports: [userpkg_e2e]
        config: {num_env_runners: 1, train_batch_size_per_learner: 100, minibatch_size: 50, num_epochs: 1}
        diagnostics: {test_count: {every: 1}}
        stop: {training_iteration: 2}
    """)
    proc = _orchestra(["run", str(spec), "--num-cpus", "2"], cwd=tmp_path)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    client, _, children = runs_of(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "e2e_imports")
    (child,) = children
    returns = client.get_metric_history(child.info.run_id, "env/episode_return_mean")
    assert returns and all(m.value == 5.0 for m in returns)  # sampled by the remote env runner
    calls = client.get_metric_history(child.info.run_id, "convergence/test_diag_calls")
    assert [m.value for m in sorted(calls, key=lambda m: m.step)] == [1.0, 2.0]


def test_cli_validate_dry_run_and_errors(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(ORCHESTRA + ["run", str(ROOT / "experiments/quickstart.yaml"), "--dry-run",
                                     "--set", "seeds=[0, 1, 2]"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "6 trials = 2 grid point(s) x 3 seed(s)" in ok.stdout
    bad = _write(tmp_path / "bad.yaml", "name: bad\nalgorithm: PPO\nenv: CartPole-v1\nconfig: {lr: {unifrm: [0, 1]}}\n")
    res = subprocess.run(ORCHESTRA + ["validate", str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 2
    assert str(bad) in res.stderr and "config.lr" in res.stderr


def test_restore_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path):
    """A checkpoint that Tune's experiment state names but `checkpoint.keep` pruning deleted (the driver killed
    between the two): restore uses the trial's newest complete checkpoint (its orchestra_checkpoint.json
    lists every file with its size) and its counters; a cut-short folder is skipped; none left: a clear error."""
    from ray import tune

    from algorithms.ray_compat import training_result
    from orchestration.trainables import CHECKPOINT_INFO, trainable_for_task

    cls = trainable_for_task("regression_demo")
    trial = tmp_path / "trial"
    saved = {}
    trainable = cls(config={"seed": 0, "steps_per_iteration": 5})
    for i in range(1, 4):
        trainable.train()
        saved[i] = trainable.save(str(trial / f"checkpoint_00000{i}"))
    state_at_2 = {k: v.clone() for k, v in torch_state(trial / "checkpoint_000002").items()}
    (trial / "checkpoint_000003" / "task.pt").write_bytes(b"cut short")  # a copy the kill interrupted
    gone = training_result(tune.Checkpoint(str(trial / "checkpoint_000004")), {})
    fresh = cls(config={"seed": 0, "steps_per_iteration": 5})
    fresh.restore(gone)
    assert fresh.iteration == 2 and fresh.task.steps == 10
    restored = fresh.task.state_dict()["model"]
    assert all(bool((restored[k] == state_at_2[k]).all()) for k in state_at_2)
    assert fresh.train()["training_iteration"] == 3
    assert saved[1].checkpoint.path.endswith("checkpoint_000001")
    for name in ("checkpoint_000001", "checkpoint_000002"):
        (trial / name / CHECKPOINT_INFO).unlink()
    with pytest.raises(ValueError, match=r"checkpoint_000004 no longer exists and .* has no complete checkpoint"):
        cls(config={"seed": 0}).restore(gone)


def torch_state(checkpoint: Path) -> dict:
    import torch

    return torch.load(checkpoint / "task.pt", weights_only=False)["task"]["model"]


def test_rl_metric_absent_until_the_first_episode_ends(ray_local, tmp_path: Path):
    """MinAtar freeway, episodes cut at 300 steps, 200-step PPO iterations: the first result carries no
    env/episode_return_mean (no episode has ended). Tune's strict metric check used to fail the trial there;
    now the trial runs on and the metric appears from the second iteration."""
    t = tracking(tmp_path)
    out = run({
        "name": "late_metric", "algorithm": "PPO", "env": "minatar/freeway",
        "config": {"env_config": {"max_episode_steps": 300}, "train_batch_size_per_learner": 200,
                   "minibatch_size": 100, "num_epochs": 1, "num_env_runners": 0},
        "seeds": [0], "stop": {"training_iteration": 3}, "metric": "env/episode_return_mean", "mode": "max",
        "tracking": t,
    })
    assert out.num_errors == 0, out.trials
    assert [tr["status"] for tr in out.trials] == ["TERMINATED"]
    client, _, (child,) = runs_of(t["uri"], "late_metric")
    assert steps_of(client, child.info.run_id, "env/episode_return_mean") == [400, 600]
    assert steps_of(client, child.info.run_id, "learner/total_loss") == [200, 400, 600]
