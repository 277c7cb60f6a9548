"""Short form of experiments/continual_minatar.yaml: PPO with NaP on a cycled MinAtar sequence."""

from __future__ import annotations

import math
from pathlib import Path

from mlflow import MlflowClient

from orchestration.runner import run
from orchestration.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_continual_minatar_short_form_logs_per_task_returns_and_plasticity(ray_local, tmp_path: Path):
    spec = load_spec(str(ROOT / "experiments/continual_minatar.yaml"), [
        "config.env_config.switch_every=300",
        "config.env_config.games=[breakout, asterix]",  # both end episodes quickly under a random policy
        "config.network={hidden: [32], cnn: {channels: [16], kernel: 3, stride: 1}, norm: layer, nap: true}",
        "config.train_batch_size_per_learner=200", "config.minibatch_size=100", "config.num_epochs=1",
        "seeds=[0]", "stop={training_iteration: 4}",
        "diagnostics.plasticity={every: 2, probe_size: 32}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage={tmp_path / 'runs'}",
        f"tracking.artifacts={tmp_path / 'art'}",
    ])
    out = run(spec)
    assert out.num_errors == 0, out.trials
    client = MlflowClient(spec.tracking.uri)
    exp = client.get_experiment_by_name("continual_minatar")
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    keys = set(child.data.metrics)
    # 800 env steps with switches every 300: both games were played, each with its own returns.
    # (gym.make's own max_episode_steps would wrap the sequence in a TimeLimit that hides the
    # per-task episode info, so the test relies on the games' natural episode ends.)
    assert {"env/task_return/task_0", "env/task_return/task_1"} <= keys, sorted(keys)
    assert any(k.startswith("plasticity/") for k in keys)
    # task_return/task_k is the mean of task k's last `window` episodes, kept across iterations: once task k
    # has finished an episode it is logged, finite, at every later iteration (RLlib's own windowed mean
    # went NaN or 0 in iterations without an episode of the task).
    for k in (0, 1):
        hist = sorted(client.get_metric_history(child.info.run_id, f"env/task_return/task_{k}"), key=lambda m: m.step)
        steps = [m.step for m in hist]
        assert steps == list(range(steps[0], 801, 200)), (k, steps)
        assert all(math.isfinite(m.value) for m in hist), (k, [m.value for m in hist])
    task_ids = [m.value for m in client.get_metric_history(child.info.run_id, "env/task_id")]
    assert task_ids[0] == 0.0 and 1.0 in task_ids
