"""Evaluate a checkpoint: deterministic episodes, returns printed and logged to the trial's MLflow run.

``orchestra eval CHECKPOINT [--env NAME] --episodes K [--video]``

Loading
    CHECKPOINT is a Tune trial checkpoint (``<launch>/<trial>/checkpoint_000003``) or any RLlib
    new-API-stack checkpoint (``algo.save()``; a learner-group or RLModule checkpoint works too). The
    trained policy is the RLModule of the learner (``learner_group/learner/rl_module/<module id>``,
    the env runner's when the learner's is absent), restored with ``RLModule.from_checkpoint``: the
    checkpoint records the module's class, so this works for RLlib's algorithms and ours (WPO, EVE,
    the ``orchestration.trainables`` wrappers) alike, without building env runners or starting Ray.
    The algorithm config (``class_and_ctor_args.pkl``) gives the default env and ``normalize_actions``.

Episodes
    K episodes; episode k resets with seed ``seed + k``; actions are the policy's deterministic action
    (the distribution's mode, the greedy Q action, the Gaussian mean), mapped to the env as the
    off-policy runner and RLlib do (Box: rescaled from [-1, 1] when ``normalize_actions``, clipped).

MLflow
    The run is the trial's child run: trial dir (the checkpoint's parent) -> ``orchestra_launch.json``
    in the launch folder (tracking URI, experiment) -> the run tagged ``orchestra.trial_id`` (the
    trial id from Tune's ``result.json``) under the launch's parent run. Logged: metrics
    ``eval/checkpoint/episode_return_{mean,std,min,max}``, ``eval/checkpoint/episode_len_mean`` and
    ``eval/checkpoint/episodes`` at the run's last training step, ``eval/checkpoint/episode_return`` per
    episode (step = episode index), tag ``orchestra.eval_checkpoint``; with ``--video`` the first
    episode as an animated GIF under the run's ``eval/`` artifacts (frames from gymnasium's
    ``render_mode="rgb_array"``; MuJoCo renders headless through the GL backend that
    :mod:`algorithms.envs` selects, EGL or OSMesa, and the video is skipped with a message otherwise;
    gymnasium's classic-control and Box2D envs draw with pygame, the optional ``video`` extra: without it
    ``--video`` fails with a one-line error saying to install it).
    Checkpoints outside a launch folder are evaluated and printed only.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.runner import LAUNCH_FILE

PREFIX = "eval/checkpoint"
VIDEO_EXTRA = "pip install 'orchestra-rl[video]'"


@dataclass
class EvalResult:
    returns: list[float]
    lengths: list[int]
    env: str
    checkpoint: str
    run_id: str | None = None
    tracking_uri: str | None = None
    video: str | None = None
    messages: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        r = np.asarray(self.returns, dtype=float)
        return {f"{PREFIX}/episode_return_mean": float(r.mean()), f"{PREFIX}/episode_return_std": float(r.std()),
                f"{PREFIX}/episode_return_min": float(r.min()), f"{PREFIX}/episode_return_max": float(r.max()),
                f"{PREFIX}/episode_len_mean": float(np.mean(self.lengths)), f"{PREFIX}/episodes": float(r.size)}


def find_module_dir(checkpoint: str | Path, module_id: str | None = None) -> Path:
    """The RLModule checkpoint folder inside an algorithm / learner-group / module checkpoint."""
    root = Path(checkpoint).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {root} is not a folder")
    if (root / "class_and_ctor_args.pkl").exists() and (root / "module_state.pt").exists():
        return root
    for sub in ("learner_group/learner/rl_module", "learner/rl_module", "rl_module", "env_runner/rl_module"):
        base = root / sub
        if base.is_dir():
            ids = sorted(d.name for d in base.iterdir() if d.is_dir())
            if module_id is not None:
                if module_id not in ids:
                    raise KeyError(f"module {module_id!r} not in checkpoint {root}; modules: {ids}")
                return base / module_id
            if ids:
                return base / ("default_policy" if "default_policy" in ids else ids[0])
    raise FileNotFoundError(f"no RLModule found in checkpoint {root} (looked for learner_group/learner/rl_module/"
                            "<module>, env_runner/rl_module/<module>)")


def checkpoint_config(checkpoint: str | Path) -> Any | None:
    """The AlgorithmConfig stored with an algorithm checkpoint (None when absent or unreadable)."""
    path = Path(checkpoint) / "class_and_ctor_args.pkl"
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # our own checkpoint files, written by RLlib
        args = data.get("ctor_args_and_kwargs", ((), {}))
        config = (args[0] or [None])[0] if args else None
        if isinstance(config, dict):  # RLlib stores the config as a dict (AlgorithmConfig.to_dict())
            from types import SimpleNamespace

            config = SimpleNamespace(env=config.get("env"), env_config=config.get("env_config") or {},
                                     normalize_actions=config.get("normalize_actions", True))
        return config if hasattr(config, "env") else None
    except Exception:  # noqa: BLE001 - classes that no longer import: fall back to defaults
        return None


def load_module(checkpoint: str | Path, module_id: str | None = None) -> Any:
    """RLModule.from_checkpoint on :func:`find_module_dir` (the module's class comes from the checkpoint)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    from algorithms import registry as R

    R.load_builtin_plugins()
    module = RLModule.from_checkpoint(str(find_module_dir(checkpoint, module_id)))
    module.eval()
    return module


def run_episodes(module: Any, env: Any, episodes: int, *, seed: int = 0, normalize_actions: bool = True,
                 max_steps: int = 100_000, render: Any = None) -> tuple[list[float], list[int], list]:
    """Deterministic episodes of ``module`` in ``env`` (see the module docstring); frames of episode 0 from
    ``render()`` when given."""
    import torch

    from algorithms.diagnostics.rllib_credit import policy_actions
    from algorithms.offpolicy.env_runner import _action_mapper

    to_env = _action_mapper(env.action_space, normalize_actions, True)
    device = next(module.parameters()).device
    returns, lengths, frames = [], [], []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, n = 0.0, 0
        if render is not None and k == 0:
            frames.append(render())
        for _ in range(max_steps):
            x = torch.as_tensor(np.asarray(obs, dtype=np.float32)[None], device=device)
            action = policy_actions(module, x, explore=False)[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(to_env(action))
            total += float(reward)
            n += 1
            if render is not None and k == 0:
                frames.append(render())
            if terminated or truncated:
                break
        returns.append(total)
        lengths.append(n)
    return returns, lengths, frames


def _render_env(env_id: str, env_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(env, render function giving an RGB frame): gymnasium's render_mode="rgb_array", else a dm_control
    env's ``physics.render`` (our ``dmc/`` adapter has no render_mode)."""
    import gymnasium as gym

    try:
        env = gym.make(env_id, render_mode="rgb_array", **env_kwargs)
    except TypeError:
        env = gym.make(env_id, **env_kwargs)
        physics = getattr(env.unwrapped, "physics", None)
        if physics is None:
            env.close()
            raise
        return env, lambda: physics.render(height=240, width=320, camera_id=0)

    def render() -> Any:
        try:
            return env.render()
        except gym.error.DependencyNotInstalled as e:
            if "pygame" not in str(e):
                raise
            from orchestration.spec import UserError

            raise UserError(f"--video: {env_id} draws its frames with pygame, which is not installed; "
                            f"{VIDEO_EXTRA} (or leave out --video)") from None

    return env, render


def write_gif(frames: list, path: Path, fps: int = 30) -> Path:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames if f is not None]
    if not images:
        raise ValueError("no frames were rendered")
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, 1000 // fps), loop=0)
    return path


def find_trial_run(checkpoint: str | Path) -> tuple[str, str, str] | None:
    """(tracking URI, experiment, run id) of the trial that wrote ``checkpoint``, or None outside a launch."""
    from mlflow import MlflowClient

    from orchestration.spec import load_spec

    ckpt = Path(checkpoint).resolve()
    trial_dir = next((p for p in [ckpt, *ckpt.parents] if (p / "result.json").exists() or (p / "params.json").exists()),
                     None)
    if trial_dir is None or not (trial_dir.parent / LAUNCH_FILE).exists():
        return None
    launch = json.loads((trial_dir.parent / LAUNCH_FILE).read_text())
    spec = load_spec(launch["spec"], check_names=False)
    trial_id = None
    result_file = trial_dir / "result.json"
    if result_file.exists():
        for line in result_file.read_text().splitlines():
            if line.strip():
                trial_id = json.loads(line).get("trial_id")
                break
    if trial_id is None:
        return None
    uri = spec.tracking.uri
    from orchestration.tracking.access import apply_credentials_file

    apply_credentials_file(spec.tracking.credentials_file)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`orchestra.trial_id` = '{trial_id}' "
                              f"and tags.`orchestra.launch_id` = '{launch['name']}'")
    if not runs:
        runs = client.search_runs([exp.experiment_id], f"tags.`orchestra.trial_id` = '{trial_id}'")
    return (uri, spec.experiment_name, runs[0].info.run_id) if runs else None


def evaluate_checkpoint(checkpoint: str | Path, *, env: str | None = None, episodes: int = 10, seed: int = 0,
                        video: bool = False, out_dir: str | Path | None = None, log: bool = True,
                        module_id: str | None = None) -> EvalResult:
    """Load, run ``episodes`` deterministic episodes, log to the trial's MLflow run (module docstring)."""
    import gymnasium as gym

    from orchestration.spec import UserError, import_builtin_envs

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    import_builtin_envs()  # registers dmc/, bsuite/, minatar/ ids and picks headless MuJoCo GL
    config = checkpoint_config(checkpoint)
    env_id = env or (config.env if config is not None and isinstance(config.env, str) else None)
    if not env_id:
        raise ValueError("--env is required: the checkpoint does not name a gymnasium env id")
    normalize = bool(getattr(config, "normalize_actions", True)) if config is not None else True
    env_kwargs = dict(getattr(config, "env_config", None) or {}) if config is not None and env is None else {}
    module = load_module(checkpoint, module_id)
    result = EvalResult([], [], env_id, str(Path(checkpoint).resolve()))
    frames: list = []
    if video:
        try:
            render_env, render = _render_env(env_id, env_kwargs)
            try:
                _, _, frames = run_episodes(module, render_env, 1, seed=seed, normalize_actions=normalize,
                                            render=render)
            finally:
                render_env.close()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - no renderer (no GL, env without rgb_array): skip the video
            result.messages.append(f"video skipped: {env_id} cannot render rgb_array frames here "
                                   f"({type(e).__name__}: {e}); MuJoCo needs MUJOCO_GL=egl or osmesa")
            frames = []
    gym_env = gym.make(env_id, **env_kwargs)
    try:
        result.returns, result.lengths, _ = run_episodes(module, gym_env, episodes, seed=seed,
                                                         normalize_actions=normalize)
    finally:
        gym_env.close()
    out = Path(out_dir) if out_dir else Path(checkpoint).resolve() / "eval"
    if frames:
        out.mkdir(parents=True, exist_ok=True)
        try:
            result.video = str(write_gif(frames, out / f"episode_0_seed{seed}.gif"))
        except ValueError as e:
            result.messages.append(f"video skipped: {e}")
    if log:
        found = find_trial_run(checkpoint)
        if found is None:
            result.messages.append("not logged: the checkpoint is not inside an orchestra launch folder with an "
                                   "MLflow run for its trial")
        else:
            _log(found, result, seed)
    return result


def _log(found: tuple[str, str, str], result: EvalResult, seed: int) -> None:
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    uri, _, run_id = found
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    step = 0
    for key in ("system/training_iteration", *run.data.metrics):
        if key in run.data.metrics:
            hist = client.get_metric_history(run_id, key)
            step = max((m.step for m in hist), default=0)
            break
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, step) for k, v in result.metrics().items()]
    metrics += [Metric(f"{PREFIX}/episode_return", r, ts, i) for i, r in enumerate(result.returns)]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag("orchestra.eval_checkpoint", result.checkpoint[:5000]),
                                                    RunTag("orchestra.eval_env", result.env),
                                                    RunTag("orchestra.eval_seed", str(seed))])
    if result.video:
        client.log_artifact(run_id, result.video, artifact_path="eval")
    result.run_id, result.tracking_uri = run_id, uri
