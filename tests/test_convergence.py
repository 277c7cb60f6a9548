"""Convergence diagnostics: closed-form cases; the callback on a real short PPO run."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.diagnostics import convergence as cv


def test_categorical_kl_closed_form():
    p = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert cv.categorical_kl(p, q) == pytest.approx(expected, rel=1e-12)
    assert cv.categorical_kl(p, p) == 0.0
    # Logits shifted by a constant give the same policy: KL 0.
    assert cv.categorical_kl(q, q + 3.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        cv.categorical_kl(p, torch.zeros(1, 3))


def test_diagonal_gaussian_kl_closed_form():
    # KL(N(0, 1) ‖ N(1, 2²)) = log 2 + (1 + 1) / 8 − 1/2
    mp, lp = torch.zeros(1, 1), torch.zeros(1, 1)
    mq, lq = torch.ones(1, 1), torch.full((1, 1), math.log(2.0), dtype=torch.float64)
    assert cv.diagonal_gaussian_kl(mp, lp, mq, lq) == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-12)
    # Two independent dims add up; two states average.
    m2 = torch.zeros(2, 2)
    assert cv.diagonal_gaussian_kl(m2, m2, m2 + 1.0, m2) == pytest.approx(1.0)  # 2 dims x 0.5


def test_argmax_flip_and_return_ratio():
    prev = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    now = torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 1.0], [4.0, 3.0]])
    assert cv.argmax_flip_fraction(prev, now) == 0.5
    assert cv.return_change_per_parameter_change(-3.0, 2.0) == 1.5
    assert math.isnan(cv.return_change_per_parameter_change(1.0, 0.0))
    assert math.isnan(cv.return_change_per_parameter_change(math.nan, 1.0))


def test_convergence_rule():
    kw = {"window": 3, "policy_tol": 0.01, "return_rtol": 0.05, "param_tol": 1e-6}
    # Not enough evaluations yet.
    s = cv.convergence_status([0.0, 0.0], [0.0, 0.0], [10.0, 10.0], [1.0, 1.0], **kw)
    assert not s.converged and s.evaluations_in_window == 2
    # Stable behaviour while parameters move: converged, parameters moving.
    s = cv.convergence_status([0.5, 0.0, 0.001, 0.0], [50, 0.1, -0.4, 0.2], [1, 100, 100, 100], [1, 1, 1, 1], **kw)
    assert s.converged and s.parameters_moving
    # Both stable.
    s = cv.convergence_status([0.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3, **kw)
    assert s.converged and not s.parameters_moving
    # A policy change above tolerance inside the window: not converged.
    s = cv.convergence_status([0.0, 0.02, 0.0], [0.0] * 3, [1.0] * 3, [1.0] * 3, **kw)
    assert not s.converged and s.parameters_moving
    # A return jump of 10% of |R|: not converged; unknown returns (NaN) are not checked.
    assert not cv.convergence_status([0.0] * 3, [0.0, 10.0, 0.0], [100.0] * 3, [1.0] * 3, **kw).converged
    assert cv.convergence_status([0.0] * 3, [math.nan] * 3, [math.nan] * 3, [1.0] * 3, **kw).converged
    with pytest.raises(ValueError, match="equal lengths"):
        cv.convergence_status([0.0], [], [], [], **kw)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from orchestration.runner import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    yield ray


def test_convergence_callback_on_ppo(ray_session):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.columns import Columns

    from algorithms.diagnostics.probe import attached_probe_set
    from algorithms.diagnostics.rllib_convergence import make_convergence_callback

    torch.set_num_threads(1)
    algo = (PPOConfig().environment("CartPole-v1")
            .env_runners(num_env_runners=0, rollout_fragment_length=64)
            .training(train_batch_size=128, minibatch_size=64, num_epochs=1)
            .rl_module(model_config={"fcnet_hiddens": [16], "fcnet_activation": "relu"})
            .debugging(seed=0)
            .callbacks(callbacks_class=[make_convergence_callback({"every": 1, "probe_size": 32, "window": 2})])
            ).build()
    module = algo.learner_group._learner.module["default_policy"]

    def snapshot():
        probe = attached_probe_set(algo).obs
        with torch.no_grad():
            logits = module.forward_inference({Columns.OBS: probe})[Columns.ACTION_DIST_INPUTS]
        return logits, {n: p.detach().clone() for n, p in module.named_parameters()}

    try:
        r1 = algo.train()
        assert "convergence/policy_change" not in r1 and r1["convergence/converged"] == 0.0
        logits1, params1 = snapshot()
        r2 = algo.train()
        logits2, params2 = snapshot()
        # Independent recomputation on the same probe set and weights.
        dtheta = math.sqrt(sum(float((params2[k] - params1[k]).pow(2).sum()) for k in params1))
        assert r2["convergence/parameter_change"] == pytest.approx(dtheta, rel=1e-6)
        assert r2["convergence/parameter_change"] > 0
        p1, p2 = torch.softmax(logits1.double(), -1), torch.softmax(logits2.double(), -1)
        kl = float((p1 * (p1.log() - p2.log())).sum(-1).mean())
        assert r2["convergence/policy_kl"] == pytest.approx(kl, rel=1e-5, abs=1e-9)
        assert r2["convergence/policy_change"] == r2["convergence/policy_kl"]
        assert r2["convergence/feature_drift"] > 0
        assert r2["convergence/parameters_moving"] == 0.0  # a window of 2 changes is not full yet
        r3 = algo.train()
        assert r3["convergence/parameters_moving"] == 1.0  # PPO keeps updating
        assert r3["convergence/converged"] in (0.0, 1.0)
        for k, v in r3.items():
            if k.startswith("convergence/"):
                assert math.isfinite(v), k
    finally:
        algo.stop()
