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
