"""`orchestra eval` on a real PPO CartPole checkpoint from a tiny launch: returns printed and logged to the
trial's MLflow run, equal to an independent greedy rollout of the checkpoint's module; GIF video."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from orchestration.runner import run


@pytest.fixture(scope="module")
def launch(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = run({"name": "eval_study", "algorithm": "PPO", "env": "CartPole-v1",
               "config": {"train_batch_size_per_learner": 200, "minibatch_size": 100, "num_epochs": 1,
                          "num_env_runners": 0},
               "seeds": [0], "stop": {"training_iteration": 2}, "checkpoint": {"frequency": 0, "at_end": True},
               "tracking": {"uri": uri, "storage": str(tmp / "runs"), "artifacts": str(tmp / "art")}})
    assert out.num_errors == 0
    ckpts = sorted(Path(out.trials[0]["path"]).glob("checkpoint_*"))
    assert ckpts, "no checkpoint written"
    return uri, ckpts[-1]


def _independent_returns(module_dir: Path, episodes: int) -> list[float]:
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(str(module_dir))
    env = gym.make("CartPole-v1")
    out = []
    for k in range(episodes):
        obs, _ = env.reset(seed=k)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                logits = module.forward_inference({Columns.OBS: torch.as_tensor(obs[None], dtype=torch.float32)})[
                    Columns.ACTION_DIST_INPUTS]
            obs, r, term, trunc, _ = env.step(int(logits.argmax(-1)[0]))
            total += r
            done = term or trunc
        out.append(total)
    return out


def test_cli_eval_prints_logs_and_matches_independent_rollout(launch, capsys, tmp_path):
    from orchestration.cli import main

    uri, ckpt = launch
    has_pygame = importlib.util.find_spec("pygame") is not None  # CartPole draws its frames with pygame
    video = ["--video", "--out", str(tmp_path / "video")] if has_pygame else []  # else: test_video_needs_pygame...
    assert main(["eval", str(ckpt), "--env", "CartPole-v1", "--episodes", "3", *video]) == 0
    printed = capsys.readouterr().out
    assert "episode 2: return" in printed and "logged under eval/checkpoint/" in printed, printed

    expected = _independent_returns(ckpt / "learner_group" / "learner" / "rl_module" / "default_policy", 3)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("eval_study")
    child = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags)
    per_episode = sorted(client.get_metric_history(child.info.run_id, "eval/checkpoint/episode_return"),
                         key=lambda m: m.step)
    assert [m.value for m in per_episode] == expected
    assert child.data.metrics["eval/checkpoint/episode_return_mean"] == pytest.approx(np.mean(expected))
    assert child.data.metrics["eval/checkpoint/episodes"] == 3
    assert child.data.tags["orchestra.eval_checkpoint"] == str(ckpt.resolve())
    # Logged at the run's last training step (env steps: 2 iterations x 200).
    hist = client.get_metric_history(child.info.run_id, "eval/checkpoint/episode_return_mean")
    assert hist[-1].step == 400
    gifs = list((tmp_path / "video").glob("*.gif"))
    if not has_pygame:
        return
    assert len(gifs) == 1 and gifs[0].stat().st_size > 1000
    from PIL import Image

    with Image.open(gifs[0]) as gif:
        # reset frame + one per step of episode 0 (PIL merges identical consecutive frames)
        assert 2 <= gif.n_frames <= int(expected[0]) + 1
    assert any(a.path.endswith(".gif") for a in client.list_artifacts(child.info.run_id, "eval"))


def test_video_needs_pygame_and_names_the_video_extra(monkeypatch):
    """CartPole's rgb_array frames come from pygame; without it (its import blocked, as when the optional
    `video` extra is not installed) --video fails with one line saying what to install."""
    from orchestration.evaluate import _render_env
    from orchestration.spec import UserError

    if importlib.util.find_spec("pygame") is not None:
        env, render = _render_env("CartPole-v1", {})
        env.reset(seed=0)
        assert np.asarray(render()).shape == (400, 600, 3)
        env.close()
    monkeypatch.setitem(sys.modules, "pygame", None)  # `import pygame` now raises ImportError
    env, render = _render_env("CartPole-v1", {})
    env.reset(seed=0)
    with pytest.raises(UserError) as e:
        render()
    env.close()  # nothing was drawn: closing needs no pygame
    assert str(e.value) == ("--video: CartPole-v1 draws its frames with pygame, which is not installed; "
                            "pip install 'orchestra-rl[video]' (or leave out --video)")


def test_eval_errors_are_clear(tmp_path):
    from orchestration.evaluate import evaluate_checkpoint, find_module_dir

    with pytest.raises(FileNotFoundError, match="no RLModule"):
        find_module_dir(tmp_path)
    with pytest.raises(ValueError, match="episodes"):
        evaluate_checkpoint(tmp_path, env="CartPole-v1", episodes=0)
