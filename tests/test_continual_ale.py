"""Short form of experiments/continual_ale.yaml: the whole path from the YAML spec through Ray Tune, RLlib's
PPO with the Nature CNN (LayerNorm + NaP arm) on `sequence/ale`, to per-game returns in MLflow.

No "learns beyond random" test: on this project's 2 shared CPU cores (measured under the other processes'
load) the ALE alone steps at about 1.1k agent steps/s (Breakout, random actions), and the whole path with
this test's settings at 19 agent steps/s (`system/env_steps_per_s` after 6 iterations of 128 steps: 6.9 s
per iteration, most of it the Nature CNN's forward and backward passes for the separate actor and critic
torsos on one torch thread). PPO needs on the order of 1M agent steps (4M frames) before Pong or Breakout
scores move reliably above a random policy's: ~15 hours here, against 15 minutes for the whole suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestration.runner import run
from orchestration.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~80 s on 2 loaded cores (Tune, RLlib's PPO build, three iterations, MLflow)
def test_continual_ale_short_form_logs_per_game_returns_and_plasticity(ray_local, tmp_path: Path):
    spec = load_spec(str(ROOT / "experiments/continual_ale.yaml"), [
        # 200-frame (50-step) episodes, 400 frames (100 steps) per game: 384 steps play both games.
        "config.env_config.games=[breakout, pong]", "config.env_config.frames_per_game=400",
        "config.env_config.max_num_frames_per_episode=200", "config.env_config.step_scale=1",
        "config.network={encoder: nature_cnn, norm: layer, nap: true}",
        "config.num_env_runners=0", "config.num_envs_per_env_runner=1", "config.num_gpus_per_learner=0",
        "config.rollout_fragment_length=128", "config.train_batch_size_per_learner=128",
        "config.minibatch_size=64", "config.num_epochs=1",
        "seeds=[0]", "stop={training_iteration: 3}",
        "diagnostics.plasticity={every: 3, probe_size: 16}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage={tmp_path / 'runs'}",
        f"tracking.artifacts={tmp_path / 'art'}",
    ])
    out = run(spec)
    assert out.num_errors == 0, out.trials
    client = MlflowClient(spec.tracking.uri)
    exp = client.get_experiment_by_name("continual_ale")
    (child,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    keys = set(child.data.metrics)
    assert {"env/task_return/task_0", "env/task_return/task_1"} <= keys, sorted(keys)
    task_ids = [m.value for m in client.get_metric_history(child.info.run_id, "env/task_id")]
    assert task_ids[0] == 0.0 and 1.0 in task_ids
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "env/task_return/task_0")]
    assert max(steps) == 384  # three iterations of 128 env steps
    # Plasticity metrics of the conv and dense layers of the Nature CNN (dormant units, ranks, norms).
    assert any(k.startswith("plasticity/") and "convs" in k for k in keys), sorted(keys)
    assert child.data.metrics["learner/network_nap_max_norm_deviation"] < 1e-5
