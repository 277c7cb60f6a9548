"""Credit-assignment diagnostics: closed-form cases on hand-made episodes; the callback on real PPO and DQN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from algorithms.diagnostics import credit as C


def test_delays_and_bins():
    d = C.steps_to_next_reward([0, 0, 1, 0, 2, 0])
    assert d.tolist() == [2, 1, 0, 1, 0, C.NO_REWARD]
    edges = (0, 1, 2, 4)
    assert C.delay_bin_labels(edges) == ["0", "1", "2_3", "4_up", "none"]
    assert C.delay_bins(np.array([2, 1, 0, 1, 0, -1, 3, 4, 100]), edges).tolist() == [2, 1, 0, 1, 0, 4, 2, 3, 3]
    with pytest.raises(ValueError, match="delay_edges"):
        C.delay_bin_labels((1, 2))
    # Negative rewards count as rewards too.
    assert C.steps_to_next_reward([0, -1]).tolist() == [1, 0]


def test_returns_td_errors_and_gae_closed_forms():
    assert C.discounted_returns([1, 1, 1], 0.5).tolist() == [1.75, 1.5, 1.0]
    assert C.discounted_returns([1, 1, 1], 0.5, bootstrap=4.0).tolist() == [2.25, 2.5, 3.0]
    # δ0 = 0 + 0.9·1 − 0.5 = 0.4; δ1 = 1 + 0 − 1 = 0 (terminal) or 1 + 0.9·2 − 1 = 1.8 (truncated, u_T = 2)
    assert C.td_errors(np.array([0.0, 1.0]), np.array([0.5, 1.0]), 2.0, True, 0.9) == pytest.approx([0.4, 0.0])
    assert C.td_errors(np.array([0.0, 1.0]), np.array([0.5, 1.0]), 2.0, False, 0.9) == pytest.approx([0.4, 1.8])
    assert C.gae_advantages(np.array([1.0, 1.0]), 0.9, 0.5 / 0.9) == pytest.approx([1.5, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        C.td_errors(np.zeros(2), np.zeros(3), 0.0, True, 0.9)


def test_exact_value_function_has_zero_td_and_value_error():
    rng = np.random.default_rng(0)
    r = rng.normal(size=12)
    g = C.discounted_returns(r, 0.97)
    ep = C.CreditEpisode(rewards=r, values=g, final_value=123.0, terminated=True)
    q = C.episode_quantities(ep, 0.97, 0.9)
    assert np.allclose(q["td_error"], 0) and np.allclose(q["value_error"], 0) and np.allclose(q["advantage"], 0)
    # Truncated: V = G with bootstrap u_T also gives zero errors.
    g2 = C.discounted_returns(r, 0.97, bootstrap=2.0)
    q2 = C.episode_quantities(C.CreditEpisode(r, g2, 2.0, False), 0.97, 0.9)
    assert np.allclose(q2["td_error"], 0) and np.allclose(q2["value_error"], 0)


def test_credit_metrics_binned_by_delay():
    # γ = 1, u ≡ 0, terminal: δ_t = r_t, G = [1, 1, 1], value error = −1 everywhere; delays [2, 1, 0].
    ep1 = C.CreditEpisode(np.array([0.0, 0.0, 1.0]), np.zeros(3), 0.0, True,
                          action_influence=np.array([3.0, 2.0, 1.0]))
    # A second episode without reward: delays none; δ = 0; G = 0.
    ep2 = C.CreditEpisode(np.zeros(2), np.zeros(2), 0.0, True, action_influence=np.array([5.0, 5.0]))
    m = C.credit_metrics([ep1, ep2], gamma=1.0, lam=1.0, edges=(0, 1, 2))
    assert m["credit/episodes"] == 2 and m["credit/steps"] == 5
    assert m["credit/td_error_mean"] == pytest.approx(0.2)
    assert m["credit/td_error_std"] == pytest.approx(np.std([0, 0, 1, 0, 0]))
    assert m["credit/td_error_mean/delay_0"] == 1.0 and m["credit/td_error_mean/delay_1"] == 0.0
    assert m["credit/td_error_mean/delay_2_up"] == 0.0
    assert m["credit/value_error_mean/delay_2_up"] == -1.0
    assert m["credit/value_error_mean/delay_none"] == 0.0
    assert m["credit/value_error_mean"] == pytest.approx(-0.6)
    # GAE with γλ = 1: A = reward-to-go of δ = [1, 1, 1] and [0, 0]
    assert m["credit/advantage_mean/delay_1"] == 1.0 and m["credit/advantage_mean/delay_none"] == 0.0
    assert m["credit/action_influence_mean/delay_none"] == 5.0 and m["credit/action_influence_mean/delay_0"] == 1.0
    assert m["credit/delay_fraction/delay_none"] == pytest.approx(0.4)
    assert sum(v for k, v in m.items() if k.startswith("credit/delay_fraction/")) == pytest.approx(1.0)
    for k in m:
        assert all(c.isalnum() or c in "_-./ " for c in k), k


def test_action_influence_closed_forms():
    assert C.action_spread(np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]])).tolist() == [2.0, 0.0]
    # Q(s, a) = s·a  =>  ∇_a Q = s, ‖s‖ = 5 for s = (3, 4)
    obs = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    norms = C.action_gradient_norm(lambda s, a: (s * a).sum(-1), obs, torch.zeros(2, 2))
    assert norms.tolist() == pytest.approx([5.0, 1.0])


# ---------------------------------------------------------------------------------------------------
# The callback on real RLlib algorithms


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from orchestration.runner import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray


def _check_keys(result: dict) -> dict[str, float]:
    got = {k: v for k, v in result.items() if k.startswith("credit/")}
    for k, v in got.items():
        assert math.isfinite(v), k
        assert all(c.isalnum() or c in "_-./ " for c in k), k
    return got


def test_credit_callback_on_ppo_matches_recomputation(ray_session):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.columns import Columns

    from algorithms.diagnostics.rllib_credit import CreditSettings, make_credit_callback

    torch.set_num_threads(1)
    settings = {"every": 1, "episodes": 2, "max_episode_steps": 60, "seed": 3}
    algo = (PPOConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=0, rollout_fragment_length=64)
            .training(train_batch_size=128, minibatch_size=64, num_epochs=1, gamma=0.9, lambda_=0.8)
            .rl_module(model_config={"fcnet_hiddens": [16]})
            .debugging(seed=0)
            .callbacks(callbacks_class=[make_credit_callback(settings)])).build()
    try:
        result = algo.train()
        m = _check_keys(result)
        assert m["credit/episodes"] == 2 and m["credit/steps"] >= 2
        # CartPole pays +1 every step: every step is in delay bin 0.
        assert m["credit/delay_fraction/delay_0"] == 1.0
        assert m["credit/td_error_mean/delay_0"] == pytest.approx(m["credit/td_error_mean"])
        assert "credit/action_influence_mean" not in m  # PPO has no Q function

        # Independent recomputation with the same module, episodes and formulas.
        from algorithms.diagnostics.rllib_credit import sample_credit_episodes

        module = algo.learner_group._learner.module["default_policy"]
        import gymnasium as gym

        env = gym.make("CartPole-v1")
        eps, _ = sample_credit_episodes(module, env, algo.config, CreditSettings(**settings), seed=3)
        ep = eps[0]
        obs, _ = env.reset(seed=3)
        with torch.no_grad():
            v0 = float(module.compute_values({Columns.OBS: torch.as_tensor(obs[None])})[0])
        assert ep.values[0] == pytest.approx(v0, rel=1e-5)
        deltas = [ep.rewards[t] + 0.9 * (ep.values[t + 1] if t + 1 < len(ep.rewards) else
                                         (0.0 if ep.terminated else ep.final_value)) - ep.values[t]
                  for t in range(len(ep.rewards))]
        all_deltas = deltas + list(C.episode_quantities(eps[1], 0.9, 0.8)["td_error"])
        assert m["credit/td_error_mean"] == pytest.approx(float(np.mean(all_deltas)), rel=1e-6)
    finally:
        algo.stop()


def test_credit_callback_on_dqn_reports_action_influence(ray_session):
    from ray.rllib.algorithms.dqn import DQNConfig

    from algorithms.diagnostics.rllib_credit import make_credit_callback

    torch.set_num_threads(1)
    algo = (DQNConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=0, rollout_fragment_length=32)
            .training(train_batch_size=32, num_steps_sampled_before_learning_starts=32)
            .rl_module(model_config={"fcnet_hiddens": [16]})
            .reporting(min_sample_timesteps_per_iteration=64)
            .debugging(seed=0)
            .callbacks(callbacks_class=[make_credit_callback({"every": 1, "episodes": 1, "max_episode_steps": 40})])
            ).build()
    try:
        m = _check_keys(algo.train())
        assert m["credit/action_influence_mean"] >= 0.0
        assert m["credit/advantage_mean"] <= 1e-9  # Q(s, a) − max_a Q(s, a) ≤ 0
    finally:
        algo.stop()
