"""Diagnostic ``plasticity`` on real RLlib algorithms (PPO, DQN on CartPole) and on a real task."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from algorithms.diagnostics.probe import ProbeSet, attached_probe_set
from algorithms.diagnostics.rllib_plasticity import (
    PlasticityHook,
    PlasticitySettings,
    make_plasticity_callback,
)
from algorithms.tasks.demo import RegressionDemo, RegressionDemoConfig

WIDTH = 32
PROBE = 64


def ppo_config(settings: dict):
    from ray.rllib.algorithms.ppo import PPOConfig

    return (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, rollout_fragment_length=64)
        .training(train_batch_size=128, minibatch_size=64, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [WIDTH, WIDTH], "fcnet_activation": "relu"})
        .debugging(seed=0)
        .callbacks(callbacks_class=[make_plasticity_callback(settings)])
    )


def plasticity_keys(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items() if k.startswith("plasticity/")}


def test_ppo_reports_sane_plasticity_metrics_and_probe_survives_checkpoints(ray_local, tmp_path):
    torch.set_num_threads(1)
    algo = ppo_config({"every": 1, "probe_size": PROBE, "hessian": True, "hessian_iters": 5}).build()
    try:
        r1 = algo.train()
        r2 = algo.train()
        p1, p2 = plasticity_keys(r1), plasticity_keys(r2)
        assert p1 and p2
        for p in (p1, p2):
            for k, v in p.items():
                assert math.isfinite(v), k
                assert all(c.isalnum() or c in "_-./ " for c in k), k
            assert 0.0 <= p["plasticity/dormant_ratio"] <= 1.0
            assert 0.0 <= p["plasticity/dead_ratio"] <= p["plasticity/dormant_ratio"]
            assert p["plasticity/weight_norm"] > 0 and p["plasticity/grad_l2"] > 0
            assert math.isfinite(p["plasticity/hessian_top_eigenvalue"])
        layer = "plasticity/default_policy/encoder.actor_encoder.net.mlp.1"  # ReLU after the first Linear
        for name in ("effective_rank", "srank", "stable_rank", "approximate_rank"):
            assert 1.0 <= p2[f"{layer}/{name}"] <= min(WIDTH, PROBE), name
        assert p2[f"{layer}/stable_rank"] <= p2[f"{layer}/effective_rank"] + 1e-9  # σ₁-dominated bound
        assert 0.0 <= p2[f"{layer}/dormant_ratio"] <= 1.0
        # Drift needs a previous computation: absent at the first one, positive after an update.
        assert "plasticity/parameter_drift" not in p1
        assert p2["plasticity/parameter_drift"] > 0
        assert p2[f"{layer}/feature_drift"] > 0
        # Weight norms agree with an independent recomputation on the learner's module.
        module = algo.learner_group._learner.module["default_policy"]
        w = module.encoder.actor_encoder.net.mlp[0].weight
        assert p2["plasticity/default_policy/encoder.actor_encoder.net.mlp.0/weight_norm"] == pytest.approx(
            float(w.detach().norm()), rel=1e-6
        )
        assert p2["plasticity/default_policy/encoder.actor_encoder.net.mlp.0/grad_l2"] == pytest.approx(
            float(w.grad.norm()), rel=1e-6
        )

        # Probe persistence: replace the probe with a recognisable one, then save.
        probe = attached_probe_set(algo)
        assert probe is not None and probe.obs.shape == (PROBE, 4)
        marked = ProbeSet(probe.obs + 0.125, seed=probe.seed, source="marked")
        algo._diagnostics_probe_set = marked
        ckpt = tmp_path / "ckpt"
        algo.save(str(ckpt))
    finally:
        algo.stop()

    from ray.rllib.algorithms.algorithm import Algorithm

    restored = Algorithm.from_checkpoint(str(ckpt))
    try:
        got = attached_probe_set(restored)
        assert got is not None and torch.equal(got.obs, marked.obs) and got.source == "marked"
        r3 = restored.train()
        assert 0.0 <= r3["plasticity/dormant_ratio"] <= 1.0
        assert torch.equal(attached_probe_set(restored).obs, marked.obs)  # still the checkpoint's probe
    finally:
        restored.stop()

    # Trainable.restore: the path Tune takes when it restores a trial into a fresh Algorithm.
    fresh = ppo_config({"every": 1, "probe_size": PROBE}).build()
    try:
        assert attached_probe_set(fresh) is None
        fresh.restore(str(ckpt))
        assert torch.equal(attached_probe_set(fresh).obs, marked.obs)
    finally:
        fresh.stop()


def test_every_k_iterations_and_settings_validation(ray_local):
    torch.set_num_threads(1)
    algo = ppo_config({"every": 2, "probe_size": 32, "ranks": False, "gradients": False}).build()
    try:
        r1, r2 = algo.train(), algo.train()
    finally:
        algo.stop()
    assert not plasticity_keys(r1)
    p2 = plasticity_keys(r2)
    assert "plasticity/dormant_ratio" in p2 and "plasticity/effective_rank" not in p2
    assert "plasticity/grad_l2" not in p2
    with pytest.raises(ValidationError, match="evry"):
        PlasticitySettings(evry=3)


def test_registry_lazy_registration():
    import algorithms.plugins  # noqa: F401
    from algorithms.diagnostics.registry import get_diagnostic, registered_diagnostics

    assert "plasticity" in registered_diagnostics()
    diag = get_diagnostic("plasticity")
    assert diag.settings is PlasticitySettings
    settings = diag.settings(every=3)
    cls = diag.rllib_callback(settings)
    from ray.rllib.callbacks.callbacks import RLlibCallback

    assert issubclass(cls, RLlibCallback) and cls.settings.every == 3
    assert isinstance(diag.task_hook(settings), PlasticityHook)


def test_dqn_reports_plasticity(ray_local):
    from ray.rllib.algorithms.dqn import DQNConfig

    torch.set_num_threads(1)
    config = (
        DQNConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, rollout_fragment_length=32)
        .training(train_batch_size=32, num_steps_sampled_before_learning_starts=32,
                  replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": 1000})
        .rl_module(model_config={"fcnet_hiddens": [WIDTH], "fcnet_activation": "relu"})
        .reporting(min_sample_timesteps_per_iteration=64)
        .debugging(seed=0)
        .callbacks(callbacks_class=[make_plasticity_callback({"every": 1, "probe_size": PROBE})])
    )
    algo = config.build()
    try:
        r = algo.train()
    finally:
        algo.stop()
    p = plasticity_keys(r)
    assert 0.0 <= p["plasticity/dormant_ratio"] <= 1.0
    assert 1.0 <= p["plasticity/effective_rank"] <= WIDTH
    assert p["plasticity/weight_norm"] > 0
    assert not any("target" in k for k in p)  # frozen target networks are not reported


# ---------------------------------------------------------------------------------------------------
# Task hook


class MLPRegression(RegressionDemo):
    """The demo regression task with a ReLU MLP instead of the linear model."""

    def __init__(self, config, seed, artifact_dir=None):
        super().__init__(config, seed, artifact_dir)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(config.dim, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=config.lr)

    def train(self) -> dict[str, float]:
        c = self.config
        for _ in range(c.steps_per_iteration):
            x = torch.randn(c.batch_size, c.dim, generator=self.gen)
            y = x @ self.w_star + c.noise * torch.randn(c.batch_size, 1, generator=self.gen)
            loss = 0.5 * (self.model(x) - y).pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.steps += 1
        return {"train/loss": loss.item()}


def test_task_hook_on_regression_demo():
    task = RegressionDemo(RegressionDemoConfig(steps_per_iteration=5), seed=1)
    hook = PlasticityHook({"every": 2, "probe_size": 16})
    task.train()
    assert hook.on_iteration(task, 1) == {}
    task.train()
    out = hook.on_iteration(task, 2)
    w = task.model.weight
    assert out["plasticity/model/weight_norm"] == pytest.approx(float(w.detach().norm()), rel=1e-6)
    assert out["plasticity/weight_norm"] == pytest.approx(float(w.detach().norm()), rel=1e-6)
    assert out["plasticity/model/grad_l2"] == pytest.approx(float(w.grad.norm()), rel=1e-6)
    assert "plasticity/dormant_ratio" not in out  # a linear model has no hidden activations
    assert torch.equal(hook.probe.obs, task.probe_inputs(16))


def test_task_hook_activation_metrics_drift_and_state():
    task = MLPRegression(RegressionDemoConfig(steps_per_iteration=5), seed=2)
    hook = PlasticityHook({"every": 1, "probe_size": 40})
    task.train()
    first = hook.on_iteration(task, 1)
    task.train()
    second = hook.on_iteration(task, 2)
    assert 0.0 <= second["plasticity/model/2/dormant_ratio"] <= 1.0
    assert 1.0 <= second["plasticity/model/2/effective_rank"] <= 16
    assert "plasticity/parameter_drift" not in first and second["plasticity/parameter_drift"] > 0
    # The layer before the LayerNorm is normalised, but tasks expose no optimiser: no effective_lr.
    assert not any(k.endswith("effective_lr") for k in second)
    # The probe is part of the hook's state: a new hook restored from it uses the same inputs.
    state = hook.state_dict()
    other = PlasticityHook({"every": 1, "probe_size": 40})
    other.load_state_dict(state)
    assert torch.equal(other.probe.obs, hook.probe.obs)
    again = other.on_iteration(task, 3)
    expected = hook.on_iteration(task, 3)
    assert again["plasticity/model/2/feature_norm"] == pytest.approx(expected["plasticity/model/2/feature_norm"])


@pytest.mark.slow
def test_tune_trial_checkpoint_carries_probe(ray_local, tmp_path):
    """A real Tune trial: the metrics reach Tune's result and its checkpoint holds the probe set."""
    import gymnasium as gym
    from ray import tune
    from ray.rllib.algorithms.algorithm import Algorithm

    from algorithms.diagnostics.probe import collect_env_probe

    tuner = tune.Tuner(
        "PPO",
        param_space=ppo_config({"every": 1, "probe_size": 32}),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), name="plasticity", verbose=0,
            stop={"training_iteration": 1},
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True),
        ),
    )
    result = tuner.fit()[0]
    assert result.error is None
    assert 0.0 <= result.metrics["plasticity/dormant_ratio"] <= 1.0
    env = gym.make("CartPole-v1")
    expected = collect_env_probe(env, 32, seed=0)  # the config's seed
    env.close()
    algo = Algorithm.from_checkpoint(result.checkpoint.path)
    try:
        assert torch.equal(attached_probe_set(algo).obs, expected.obs)
    finally:
        algo.stop()


def test_effective_lr_on_project_networks_with_layernorm(ray_local):
    """PPO on our network builders (LayerNorm before each nonlinearity): effective_lr = η/‖w‖ (Adam)."""
    from algorithms.networks.block import apply_network_block
    from algorithms.networks.config import NetworkConfig

    torch.set_num_threads(1)
    lr = 3e-4
    config = ppo_config({"every": 1, "probe_size": PROBE}).training(lr=lr)
    apply_network_block(config, NetworkConfig(hidden=[WIDTH, WIDTH], norm="layer", nap=True))
    algo = config.build()
    try:
        p = plasticity_keys(algo.train())
    finally:
        algo.stop()
    elr = {k: v for k, v in p.items() if k.endswith("/effective_lr") and k.count("/") > 2}
    assert len(elr) >= 2, sorted(p)
    for k, v in elr.items():
        wn = p[k.replace("/effective_lr", "/weight_norm")]
        assert v == pytest.approx(lr / wn, rel=1e-6)
    assert 0.0 <= p["plasticity/dormant_ratio"] <= 1.0
    assert p["plasticity/effective_lr"] == pytest.approx(sum(elr.values()) / len(elr))
