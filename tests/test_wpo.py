"""WPO: the pure losses against closed forms, config validation, and WPO learning / restoring / running
through Tune (real RLlib, real envs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from algorithms.wpo import losses as L

# ---------------------------------------------------------------------------------------------------
# Losses (no Ray)


def _policy_grads(mean0: float, std0: float, center: float, n: int, seed: int = 0):
    """Gradients of WPO's policy loss w.r.t. (μ, σ) of a 1-D Gaussian with Q(a) = −(a − c)²/2 (B = 1)."""
    mean = torch.tensor([[mean0]], dtype=torch.float64, requires_grad=True)
    std = torch.tensor([[std0]], dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, 1, 1), generator=gen, dtype=torch.float64)
    actions = (mean + std * eps).detach()
    grad_q = -(actions - center)  # ∇_a Q for Q(a) = −(a − c)²/2
    mean_p, std_p = L.fisher_preconditioned(mean, std)
    loss, _ = L.wpo_policy_loss(L.gaussian_grad_log_prob(actions, mean_p, std_p), grad_q)
    loss.backward()
    return mean.grad.item(), std.grad.item(), actions, grad_q


def test_fisher_trick_keeps_forward_values_and_scales_gradients():
    mean = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.5, 1.7], dtype=torch.float64, requires_grad=True)
    mean_p, std_p = L.fisher_preconditioned(mean, std)
    assert torch.allclose(mean_p, mean, rtol=0, atol=1e-15) and torch.allclose(std_p, std, rtol=0, atol=1e-15)
    (mean_p.sum() + std_p.sum()).backward()
    var = std.detach() ** 2
    assert torch.allclose(mean.grad, var) and torch.allclose(std.grad, var / 2)


def test_policy_update_equals_per_sample_closed_form():
    """−∂loss/∂μ = Σ_n ∇_a Q(a_n) and −∂loss/∂σ = Σ_n ((a_n − μ)/σ)·∇_a Q(a_n) exactly (σ², σ²/2 applied)."""
    mu, sigma, c = 0.4, 0.8, 1.5
    g_mean, g_std, actions, grad_q = _policy_grads(mu, sigma, c, n=7)
    assert -g_mean == pytest.approx(grad_q.sum().item(), rel=1e-12)
    assert -g_std == pytest.approx((((actions - mu) / sigma) * grad_q).sum().item(), rel=1e-12)
    # without the preconditioning the gradients carry 1/σ² and 2/σ²: the trick really changes them
    mean = torch.tensor([[mu]], dtype=torch.float64, requires_grad=True)
    std = torch.tensor([[sigma]], dtype=torch.float64, requires_grad=True)
    loss, _ = L.wpo_policy_loss(L.gaussian_grad_log_prob(actions, mean, std), grad_q)
    loss.backward()
    assert mean.grad.item() == pytest.approx(g_mean / sigma**2, rel=1e-12)
    assert std.grad.item() == pytest.approx(2 * g_std / sigma**2, rel=1e-12)


def test_policy_update_matches_expectations_for_quadratic_q():
    """E[∇_a Q] = c − μ and E[((a − μ)/σ)·∇_a Q] = −σ for Q(a) = −(a − c)²/2 (Monte Carlo, N = 200k)."""
    mu, sigma, c, n = -0.3, 0.6, 0.9, 200_000
    g_mean, g_std, _, _ = _policy_grads(mu, sigma, c, n=n, seed=1)
    assert -g_mean / n == pytest.approx(c - mu, abs=5 * sigma / math.sqrt(n))
    assert -g_std / n == pytest.approx(-sigma, abs=0.01)


def test_policy_loss_mask_and_shapes():
    g = torch.randn(5, 3, 2)
    dq = torch.randn(5, 3, 2)
    full, stats = L.wpo_policy_loss(g, dq)
    assert full.shape == () and set(stats) == {"grad_q_abs_mean", "grad_q_norm"}
    masked, _ = L.wpo_policy_loss(g, dq, mask=torch.tensor([1.0, 0.0, 1.0]))
    per_state = (g * dq).sum(dim=(0, 2))
    assert masked.item() == pytest.approx(-(per_state[0] + per_state[2]).item() / 2, rel=1e-6)
    assert full.item() == pytest.approx(-per_state.mean().item(), rel=1e-6)


def test_decoupled_kl_closed_forms_and_penalty():
    tm, ts = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.5]])
    m, s = torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 1.0]])
    kl_m, kl_s = L.decoupled_gaussian_kl(tm, ts, m, s)
    assert torch.allclose(kl_m, torch.tensor([[0.125, 0.0]]))
    assert torch.allclose(kl_s, torch.tensor([[0.0, math.log(2.0) + 0.125 - 0.5]]))
    # the same numbers from torch.distributions
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(tm, ts), torch.distributions.Normal(tm, s))
    assert torch.allclose(kl_s, ref, atol=1e-6)
    la_m, la_s = torch.tensor(0.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    penalty, dual, stats = L.kl_penalty(kl_m, kl_s, la_m, la_s, 0.01, 1e-3)
    alpha_m, alpha_s = math.log(2.0) + 1e-8, math.log1p(math.exp(2.0)) + 1e-8
    assert penalty.item() == pytest.approx(alpha_m * 0.125 + alpha_s * kl_s.sum().item(), rel=1e-5)
    assert penalty.requires_grad is False  # α is held constant in the penalty
    dual.backward()  # KL_μ (0.125) > ε_μ: the dual gradient pushes log α_μ up (−grad > 0)
    assert la_m.grad.item() < 0
    assert stats["kl_mean_rel"].item() == pytest.approx(0.0625 / 0.01)


def test_expected_sarsa_target_and_critic_loss():
    R = torch.tensor([1.0, 2.0])
    disc = torch.tensor([0.9, 0.0])  # second transition ended in a terminal state
    tq = torch.tensor([[1.0, 5.0], [3.0, 7.0]])  # [M=2, B=2]
    y = L.expected_sarsa_targets(R, disc, tq)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 2.0, 2.0]))
    q = torch.tensor([2.0, 0.0], requires_grad=True)
    loss, stats = L.critic_loss(q, y)
    assert loss.item() == pytest.approx(0.5 * ((2.8 - 2.0) ** 2 + 2.0**2) / 2)
    loss.backward()
    assert torch.allclose(q.grad, -(y - q.detach()) / 2)


def test_cube_root_squashing():
    x = torch.tensor([-8.0, 0.0, 27.0])
    assert torch.allclose(L.cube_root(x), torch.tensor([-2.0, 0.0, 3.0]))


def test_action_penalty_gradient_and_its_effect_on_the_mean_update():
    a = torch.tensor([-3.0, -1.0, 0.2, 1.0, 1.5])
    assert torch.equal(L.out_of_bounds_grad(a), torch.tensor([4.0, 0.0, 0.0, 0.0, -1.0]))
    # Through the policy loss: with dQ = 0 and the penalty only, the Fisher-preconditioned mean update is
    # Δμ ∝ σ²·mean_n c·(−2)(a_n − clip(a_n)); a mean far above the bound is pushed back down.
    mean = torch.tensor([[3.0]], requires_grad=True)
    std = torch.tensor([[0.5]])
    actions = torch.tensor([[[2.5]], [[3.5]]])  # N=2, B=1, D=1, both outside
    grad_q = 0.1 * L.out_of_bounds_grad(actions)
    mp, sp = L.fisher_preconditioned(mean, std)
    loss, _ = L.wpo_policy_loss(L.gaussian_grad_log_prob(actions, mp, sp), grad_q)
    loss.backward()
    # ∂loss/∂μ = −Σ_n σ²·(1/σ²)·dQ_n = −Σ_n dQ_n = −0.1·(−2)(1.5 + 2.5) = 0.8 > 0 (descent lowers μ)
    assert torch.allclose(mean.grad, torch.tensor([[0.8]]))


def test_critic_clip_actions_zeroes_dq_outside_the_bounds_and_feeds_clipped_replay_actions():
    from algorithms.wpo.learner import WPOSettings, wpo_loss

    class Policy(torch.nn.Module):  # mean 3 (far above the bound 1), std 0.1: every sample is outside
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.tensor([[3.0]]))

        def forward(self, obs):
            return self.mean.expand(obs.shape[0], 1), torch.full((obs.shape[0], 1), 0.1)

    seen = []

    def critic(obs, a):  # Q = 2·a (its action gradient is 2 wherever the action is not clipped)
        seen.append(a.detach().clone())
        return 2.0 * a.sum(-1)

    batch = {"obs": torch.zeros(1, 2), "action": torch.tensor([[1.7]]), "bootstrap_obs": torch.zeros(1, 2),
             "nstep_return": torch.zeros(1), "bootstrap_discount": torch.zeros(1)}
    zero = torch.tensor(0.0)
    grads = {}
    for clip in (True, False):
        policy, seen[:] = Policy(), []
        total, stats = wpo_loss(policy, critic, policy, critic, zero, zero, batch,
                                WPOSettings(num_action_samples=4, num_target_action_samples=3,
                                            critic_clip_actions=clip), torch.Generator().manual_seed(0))
        policy.mean.grad = None
        stats["policy_loss"].backward()
        grads[clip] = policy.mean.grad.item()
        # calls: target critic (3 samples), critic on the replay action, critic on the 4 policy samples
        assert seen[1].item() == (1.0 if clip else pytest.approx(1.7))
        assert (seen[2].max().item() <= 1.0) == clip
    # Fisher-preconditioned mean gradient = −Σ_n dQ_n: 0 with clipping, −4·2 = −8 without
    assert grads[True] == 0.0 and grads[False] == pytest.approx(-8.0)


def test_clipped_double_q_target_is_min_per_action_then_mean():
    """y = R + d·(1/M) Σ_m min_i Q_targ,i(s', a'_m) on a case where the min after the mean differs."""
    R, disc = torch.tensor([1.0, 2.0]), torch.tensor([0.9, 0.5])
    q1 = torch.tensor([[1.0, 5.0], [3.0, 7.0]])  # [M=2, B=2]
    q2 = torch.tensor([[2.0, 4.0], [0.0, 9.0]])
    per_action_min = L.clipped_double_q(torch.stack([q1, q2]))
    assert torch.equal(per_action_min, torch.tensor([[1.0, 4.0], [0.0, 7.0]]))
    y = L.expected_sarsa_targets(R, disc, per_action_min)
    # min then mean: (0.5, 5.5); the mean then the min would be min((2, 6), (1.5, 6.5)) = (1.5, 6)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 0.5, 2.0 + 0.5 * 5.5]))
    # one critic: the single-critic target unchanged
    assert torch.equal(L.expected_sarsa_targets(R, disc, L.clipped_double_q(q1.unsqueeze(0))),
                       L.expected_sarsa_targets(R, disc, q1))


def test_twin_critics_in_wpo_loss_by_hand():
    """wpo_loss with two critics: the target is min-then-mean at the target actions the critics saw, both
    critics regress onto it (their losses add up in the total), and the policy follows ∇_a of their mean."""
    from algorithms.wpo.learner import WPOSettings, wpo_loss

    class Policy(torch.nn.Module):  # 1-D Gaussian, μ = 0.2, σ = 0.5
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.tensor([[0.2]], dtype=torch.float64))

        def forward(self, obs):
            return self.mean.expand(obs.shape[0], 1), torch.full((obs.shape[0], 1), 0.5, dtype=torch.float64)

    seen = []

    def record(fn):
        def critic(obs, a):
            seen.append(a.detach().clone())
            return fn(a).sum(-1)
        return critic

    critics = (record(lambda a: 3.0 * a), record(lambda a: -a + 1.0))  # ∇_a Q̄ = (3 − 1)/2 = 1
    targets = (record(lambda a: 2.0 * a), record(lambda a: a + 0.5))  # cross at a = 0.5
    batch = {"obs": torch.zeros(1, 1, dtype=torch.float64), "action": torch.tensor([[0.4]], dtype=torch.float64),
             "bootstrap_obs": torch.zeros(1, 1, dtype=torch.float64),
             "nstep_return": torch.tensor([1.0], dtype=torch.float64),
             "bootstrap_discount": torch.tensor([0.9], dtype=torch.float64)}
    policy, zero = Policy(), torch.tensor(0.0, dtype=torch.float64)
    settings = WPOSettings(num_action_samples=4, num_target_action_samples=64, critic_clip_actions=False)
    total, stats = wpo_loss(policy, critics, policy, targets, zero, zero, batch, settings,
                            torch.Generator().manual_seed(0))
    a_next = seen[0].flatten()  # calls: both targets at the same M actions, both critics at a, both at the samples
    assert torch.equal(seen[1].flatten(), a_next) and a_next.min() < 0.5 < a_next.max()  # both critics win somewhere
    y = 1.0 + 0.9 * torch.minimum(2.0 * a_next, a_next + 0.5).mean().item()
    assert stats["target_q_mean"].item() == pytest.approx(y, rel=1e-12)
    assert stats["critic_loss"].item() == pytest.approx(0.5 * (y - 1.2) ** 2, rel=1e-12)  # Q_1(a) = 1.2
    assert stats["critic_2_loss"].item() == pytest.approx(0.5 * (y - 0.6) ** 2, rel=1e-12)  # Q_2(a) = 0.6
    assert stats["twin_q_abs_diff"].item() == pytest.approx(0.6, rel=1e-12)
    assert total.item() == pytest.approx((stats["critic_loss"] + stats["critic_2_loss"] + stats["policy_loss"]
                                          + stats["kl_penalty"]).item(), rel=1e-12)
    stats["policy_loss"].backward()  # Fisher-preconditioned mean gradient = −Σ_n ∇_a Q̄ = −4·1
    assert policy.mean.grad.item() == pytest.approx(-4.0, rel=1e-12)
    with pytest.raises(ValueError, match="one target per critic"):
        wpo_loss(policy, critics, policy, targets[:1], zero, zero, batch, settings, torch.Generator())


# ---------------------------------------------------------------------------------------------------
# Action bounds (policy_bound)


def _bound_batch():
    return {"obs": torch.zeros(1, 1), "action": torch.zeros(1, 1), "bootstrap_obs": torch.zeros(1, 1),
            "nstep_return": torch.zeros(1), "bootstrap_discount": torch.zeros(1)}


def test_tanh_squash_policy_gradient_by_hand():
    """1-D, μ_u = 0.3, σ_u = 0.5, u = (0.8, −0.2), Q(a) = −(a − 0.5)², a = tanh u. By hand:
    ∇_u Q(tanh u) = (1 − a²)·(−2)(a − 0.5), and the Fisher-preconditioned policy loss has
    −∂L/∂μ = Σ_n ∇_u Q_n,  −∂L/∂σ = Σ_n ((u_n − μ)/σ)·∇_u Q_n."""
    mu, sigma, us = 0.3, 0.5, (0.8, -0.2)
    # a = (0.664037, −0.197375); 1 − a² = (0.559055, 0.961043); ∇_a Q = −2(a − 0.5) = (−0.328074, 1.394751)
    # ∇_u Q = (−0.183411, 1.340415); (u − μ)/σ = (1, −1)
    # ∂L/∂μ = −(−0.183411 + 1.340415) = −1.157004;  ∂L/∂σ = −(1·(−0.183411) + (−1)·1.340415) = 1.523827
    expect_mu, expect_sigma = -1.157004, 1.523827
    a = [math.tanh(u) for u in us]
    dq_u = [(1 - x * x) * (-2.0) * (x - 0.5) for x in a]
    assert dq_u[0] == pytest.approx(-0.183411, abs=1e-6) and dq_u[1] == pytest.approx(1.340415, abs=1e-6)

    mean = torch.tensor([[mu]], dtype=torch.float64, requires_grad=True)
    std = torch.tensor([[sigma]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor(us, dtype=torch.float64).reshape(2, 1, 1)
    actions = torch.tanh(u).requires_grad_(True)
    grad_a = torch.autograd.grad((-(actions - 0.5).square()).sum(), actions)[0]
    grad_u = L.tanh_squash_grad(u, grad_a)
    # the chain rule of Q(tanh u) by autograd gives the same ∇_u Q
    u_var = u.clone().requires_grad_(True)
    auto_u = torch.autograd.grad((-(torch.tanh(u_var) - 0.5).square()).sum(), u_var)[0]
    assert torch.allclose(grad_u, auto_u, rtol=1e-12, atol=0)
    mp, sp = L.fisher_preconditioned(mean, std)
    loss, _ = L.wpo_policy_loss(L.gaussian_grad_log_prob(u, mp, sp), grad_u)
    loss.backward()
    assert mean.grad.item() == pytest.approx(expect_mu, abs=1e-6)
    assert std.grad.item() == pytest.approx(expect_sigma, abs=1e-6)
    # far past the bound the chain factor is tiny but exact (no 1 − tanh² cancellation to 0 at u = 12)
    assert L.tanh_squash_grad(torch.tensor([12.0]), torch.tensor([1.0])).item() == pytest.approx(4 * math.exp(-24), rel=1e-5)


def test_tanh_squash_wiring_in_wpo_loss():
    """wpo_loss with policy_bound=tanh_squash: the critic only sees tanh(u) (target and policy samples),
    and the μ_u gradient equals −Σ_n (1 − a_n²)·∇_a Q(a_n) at the actions the critic saw."""
    from algorithms.wpo.learner import WPOSettings, wpo_loss

    class Policy(torch.nn.Module):  # μ_u = 3 (tanh 3 = 0.995), σ_u = 0.5
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.tensor([[3.0]], dtype=torch.float64))

        def forward(self, obs):
            return self.mean.expand(obs.shape[0], 1), torch.full((obs.shape[0], 1), 0.5, dtype=torch.float64)

    seen = []

    def critic(obs, a):
        seen.append(a.detach().clone())
        return -(a - 0.5).square().sum(-1)

    batch = {k: v.double() for k, v in _bound_batch().items()}
    policy, zero = Policy(), torch.tensor(0.0, dtype=torch.float64)
    _, stats = wpo_loss(policy, critic, policy, critic, zero, zero, batch,
                        WPOSettings(num_action_samples=6, num_target_action_samples=5, policy_bound="tanh_squash"),
                        torch.Generator().manual_seed(0))
    stats["policy_loss"].backward()
    target_actions, actions = seen[0], seen[2]
    assert target_actions.shape == (5, 1, 1) and actions.shape == (6, 1, 1)
    assert target_actions.abs().max() < 1 and actions.abs().max() < 1
    expected = -((1 - actions.square()) * (-2.0) * (actions - 0.5)).sum().item()
    assert policy.mean.grad.item() == pytest.approx(expected, rel=1e-8)
    assert stats["policy_mean_abs"].item() == pytest.approx(math.tanh(3.0))
    assert stats["policy_mean_out_of_bounds"].item() == 0.0 and stats["policy_mean_saturated"].item() == 1.0


@pytest.mark.parametrize("bound", ["tanh_mean", "tanh_squash"])
def test_bounded_policy_mean_and_actions_stay_in_bounds(bound):
    import gymnasium as gym
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from algorithms.wpo.module import WPOModule

    obs_space, act_space = gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,))
    mc = {"policy_bound": bound, "policy_hidden": [8], "critic_hidden": [8], "init_scale": 0.5}
    module = RLModuleSpec(WPOModule, obs_space, act_space, model_config=mc, inference_only=True).build()
    with torch.no_grad():  # make the raw mean huge, whatever the observation
        for p in module.policy.parameters():
            p.mul_(1000.0)
    obs = torch.randn(64, 3) * 10
    mean, _ = module.policy(obs)
    det = module.act(obs, explore=False, generator=None)
    sampled = module.act(obs, explore=True, generator=torch.Generator().manual_seed(0))
    assert det.abs().max() <= 1.0 and det.abs().max() > 0.9  # bounded, and the raw output really was large
    if bound == "tanh_mean":
        assert mean.abs().max() <= 1.0 and torch.equal(det, mean)
    else:  # the Gaussian is over u; the deterministic action is tanh of its mean, every sample is tanh(u)
        assert mean.abs().max() > 1.0 and torch.equal(det, torch.tanh(mean))
        assert sampled.abs().max() <= 1.0
    stats = L.mean_bound_stats(module.policy.to_action(mean))
    assert stats["policy_mean_out_of_bounds"].item() == 0.0


def _bandit(bound: str, steps: int, centers=(1.5,), seed: int = 0) -> list[tuple[float, float]]:
    """1-D bandit through wpo_loss: critic Q(a) = −(a − c)² (extrapolating; seen at clip(a), the default, its
    optimum is the bound 1.0), a GaussianPolicy on a constant observation, Adam 0.02. Returns the
    action-space mean and policy_mean_out_of_bounds after each phase (one phase per centre c)."""
    from algorithms.wpo.learner import WPOSettings, wpo_loss
    from algorithms.wpo.module import GaussianPolicy

    torch.manual_seed(seed)
    net = torch.nn.Linear(1, 2)
    torch.nn.init.zeros_(net.weight)
    torch.nn.init.zeros_(net.bias)
    policy = GaussianPolicy(net, 1, 0.5, bound)
    opt = torch.optim.Adam(policy.parameters(), lr=0.02)
    gen, zero = torch.Generator().manual_seed(seed), torch.tensor(0.0)
    settings = WPOSettings(num_action_samples=16, num_target_action_samples=1, policy_bound=bound)
    out = []
    for c in centers:
        critic = lambda o, a, c=c: -(a - c).square().sum(-1)  # noqa: E731
        for _ in range(steps):
            total, stats = wpo_loss(policy, critic, policy, critic, zero, zero, _bound_batch(), settings, gen)
            opt.zero_grad()
            total.backward()
            opt.step()
        with torch.no_grad():
            mean = policy.to_action(policy(torch.zeros(1, 1))[0]).item()
        out.append((mean, stats["policy_mean_out_of_bounds"].item()))
    return out


def test_bandit_with_optimum_at_the_bound_unbounded_mean_drifts_out_bounded_ones_converge_near_it():
    """Optimum at the bound 1.0 (critic at clip(a)): the unbounded mean drifts past it (1.4 after 600
    updates; with plain SGD it ends out of reach of every sample and stays there for good), the tanh
    bounds converge just inside it and come back when the optimum moves to 0."""
    torch.set_num_threads(1)
    (mean_none, oob_none), = _bandit("none", 600)
    assert mean_none > 1.2 and oob_none == 1.0
    for bound in ("tanh_mean", "tanh_squash"):
        (m1, oob1), (m2, _) = _bandit(bound, 600, centers=(1.5, 0.0))
        assert 0.95 < m1 <= 1.0 and oob1 == 0.0, bound
        assert abs(m2) < 0.1, bound


# ---------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_validation_errors():
    from algorithms.wpo.config import WPOConfig

    cfg = WPOConfig()
    assert (cfg.samples_per_insert, cfg.num_action_samples, cfg.lr, cfg.train_batch_size_per_learner) == (32.0, 20, 1e-4, 256)
    assert (cfg.n_step, cfg.grad_clip, cfg.target_update_period, cfg.target_update_tau) == (5, 40.0, 100, 1.0)
    assert (cfg.replay_capacity, cfg.learning_starts, cfg.gamma) == (1_000_000, 1000, 0.99)
    for bad, key in ((dict(num_action_samples=0), "num_action_samples"), (dict(squash_grad_q="tanh"), "squash_grad_q"),
                     (dict(samples_per_insert=-1.0), "samples_per_insert"), (dict(target_update_tau=2.0), "target_update_tau"),
                     (dict(policy_hidden=[]), "policy_hidden"),
                     (dict(action_penalty=-1.0), "action_penalty"),
                     (dict(critic_clip_actions="yes"), "critic_clip_actions"),
                     (dict(policy_bound="tanh"), "policy_bound")):
        with pytest.raises(ValueError, match=key):
            WPOConfig().environment("Pendulum-v1").training(**bad).validate()
    assert cfg.policy_bound == "none"  # the reference; the tanh bounds are opt-in
    with pytest.raises(ValueError, match="allowed: none, tanh_mean, tanh_squash"):
        WPOConfig().environment("Pendulum-v1").training(policy_bound="clip").validate()
    with pytest.raises(ValueError, match="action_space"):
        _discrete_cfg().validate()


def _discrete_cfg():
    import gymnasium as gym

    from algorithms.wpo.config import WPOConfig

    return WPOConfig().environment(observation_space=gym.spaces.Box(-1, 1, (3,)), action_space=gym.spaces.Discrete(2))


def test_num_critics_setting_default_listing_and_one_line_spec_error(tmp_path: Path):
    import subprocess
    import sys

    from algorithms.wpo.config import WPOConfig, WPOSettings
    from orchestration.spec import settings_listing

    assert WPOConfig().num_critics == 1 and WPOConfig()._model_config_auto_includes["num_critics"] == 1
    WPOConfig().environment("Pendulum-v1").training(num_critics=2).validate()
    row = next(line for line in settings_listing("WPO") if line.split()[:1] == ["num_critics"])
    assert row.split()[1:3] == ["int", "1"] and "an int in [1, 2]" in row
    assert row.endswith(WPOSettings.model_fields["num_critics"].description) and "clipped double-Q" in row
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nalgorithm: WPO\nenv: Pendulum-v1\nconfig:\n  num_critics: 3\n")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "orchestration.cli", "validate", str(spec)], cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {spec}: config.num_critics: got 3; allowed: an int in [1, 2]"]


# ---------------------------------------------------------------------------------------------------
# RLlib: learning, save/restore, Tune


def small_wpo(env: str = "Pendulum-v1", seed: int = 0, **training):
    from algorithms.wpo.config import WPOConfig

    settings = dict(policy_hidden=[64, 64], critic_hidden=[64, 64], num_action_samples=8, num_target_action_samples=8,
                    train_batch_size_per_learner=128, samples_per_insert=128.0, lr=3e-4, n_step=3,
                    learning_starts=400, max_updates_per_call=64)
    settings.update(training)
    cfg = WPOConfig().environment(env).training(**settings).debugging(seed=seed)
    cfg.min_sample_timesteps_per_iteration = 1000
    return cfg


@pytest.mark.slow
def test_wpo_learns_pendulum(ray_local):
    torch.set_num_threads(1)
    cfg = small_wpo()
    cfg.metrics_num_episodes_for_smoothing = 5  # the mean of the last 5 episodes (1000 env steps)
    algo = cfg.build_algo()
    try:
        best = -float("inf")
        for _ in range(15):
            result = algo.train()
            ret = result["env_runners"].get("episode_return_mean")
            if ret is not None:
                best = max(best, ret)
            if best > -400:
                break
        assert best > -400, f"WPO did not reach -400 on Pendulum-v1 within 15k env steps (best {best:.0f})"
        learner = result["learners"]["default_policy"]
        for key in ("critic_loss", "policy_loss", "kl_penalty", "policy_std_mean", "q_mean", "policy_grad_norm",
                    "policy_mean_abs", "policy_mean_out_of_bounds"):
            assert math.isfinite(learner[key])
    finally:
        algo.stop()


def test_wpo_save_restore_continues_training(ray_local, tmp_path: Path):
    from ray.rllib.algorithms.algorithm import Algorithm

    torch.set_num_threads(1)
    cfg = small_wpo(policy_hidden=[16], critic_hidden=[16], train_batch_size_per_learner=32, learning_starts=100,
                    num_action_samples=2, num_target_action_samples=2, samples_per_insert=16.0)
    cfg.min_sample_timesteps_per_iteration = 200
    cfg.rollout_fragment_length = 50
    algo = cfg.build_algo()
    try:
        algo.train()
        path = algo.save(str(tmp_path / "ckpt")).checkpoint.path
        before = algo.train()
    finally:
        algo.stop()
    restored = Algorithm.from_checkpoint(path)
    try:
        after = restored.train()
        assert after["num_env_steps_sampled_lifetime"] == before["num_env_steps_sampled_lifetime"] == 400
        # counters continue; without the replay in the checkpoint the batches differ (the core's tests
        # check the bit-identical continuation with the replay)
        updates = before["learners"]["default_policy"]["num_updates_lifetime"]
        assert after["learners"]["default_policy"]["num_updates_lifetime"] == updates == 150
        assert math.isfinite(after["learners"]["default_policy"]["critic_loss"])
    finally:
        restored.stop()


def test_wpo_twin_critics_update_both_critics_and_round_trip_through_a_checkpoint(ray_local, tmp_path: Path):
    """num_critics 2: both critics (and their targets) are built on the learner, not on the env runner; one
    iteration of updates changes both through the one critic optimiser; the plasticity diagnostic reports
    both; save / from_checkpoint restores both critics and their targets exactly and training continues."""
    from ray.rllib.algorithms.algorithm import Algorithm

    from algorithms.diagnostics.rllib_plasticity import learner_plasticity_metrics

    torch.set_num_threads(1)
    cfg = small_wpo(policy_hidden=[16], critic_hidden=[16], train_batch_size_per_learner=32, learning_starts=100,
                    num_action_samples=2, num_target_action_samples=2, samples_per_insert=16.0, num_critics=2,
                    target_update_period=10)
    cfg.min_sample_timesteps_per_iteration = 200
    cfg.rollout_fragment_length = 50
    algo = cfg.build_algo()
    try:
        learner = algo.learner_group._learner
        m = learner.module["default_policy"].unwrapped()
        assert len(m.critics()) == 2 and len(m.target_critics()) == 2 and m.critics()[1] is m.critic_2
        assert not hasattr(algo.env_runner.module, "critic_2")  # learner only
        names = {n for n, _ in m.named_parameters()}
        assert any(n.startswith("critic_2.") for n in names) and any(n.startswith("target_critic_2.") for n in names)
        critic_opt = dict(learner.get_optimizers_for_module("default_policy"))["critic"]
        in_opt = {id(p) for group in critic_opt.param_groups for p in group["params"]}
        assert in_opt == {id(p) for c in m.critics() for p in c.parameters()}
        before = [[p.detach().clone() for p in c.parameters()] for c in m.critics()]
        result = algo.train()
        stats = result["learners"]["default_policy"]
        assert stats["num_updates_lifetime"] == 50
        for key in ("critic_loss", "critic_2_loss", "twin_q_abs_diff"):
            assert math.isfinite(stats[key]), key
        for c, old in zip(m.critics(), before):
            assert all(not torch.equal(p, q) for p, q in zip(c.parameters(), old))
        # 50 updates, a copy every 10: the targets equal the online critics, which differ from each other
        for c, t in zip(m.critics(), m.target_critics()):
            assert all(torch.equal(p, q) for p, q in zip(c.parameters(), t.parameters()))
        assert not all(torch.equal(p, q) for p, q in zip(m.critic.parameters(), m.critic_2.parameters()))
        metrics = learner_plasticity_metrics(learner, probe_obs=torch.zeros(8, 3).numpy(),
                                             settings={"ranks": False, "drift": False})
        for critic in ("critic", "critic_2"):
            assert any(k.startswith(f"default_policy/{critic}.") and k.endswith("dormant_ratio") for k in metrics)
            assert any(k.startswith(f"default_policy/{critic}.") and k.endswith("grad_l2") for k in metrics)
        path = algo.save(str(tmp_path / "ckpt")).checkpoint.path
        saved = {k: v.detach().clone() for k, v in m.state_dict().items() if "critic" in k}
    finally:
        algo.stop()
    restored = Algorithm.from_checkpoint(path)
    try:
        m2 = restored.learner_group._learner.module["default_policy"].unwrapped()
        state = m2.state_dict()
        assert {k for k in state if "critic" in k} == set(saved)
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        after = restored.train()["learners"]["default_policy"]
        assert after["num_updates_lifetime"] == 150 and math.isfinite(after["critic_2_loss"])  # 50 + 200 steps · 16 / 32
    finally:
        restored.stop()


def test_wpo_runs_through_tune_by_name(ray_local, tmp_path: Path):
    from orchestration.runner import run

    result = run({
        "name": "wpo_tune", "algorithm": "WPO", "env": "Pendulum-v1",
        "config": {"policy_hidden": [16], "critic_hidden": [16], "num_action_samples": 2,
                   "num_target_action_samples": 2, "train_batch_size_per_learner": 32, "learning_starts": 100,
                   "samples_per_insert": 16.0, "min_sample_timesteps_per_iteration": 200,
                   "policy_bound": "tanh_squash",
                   "network": {"hidden": [16, 16], "norm": "layer", "activation": "elu", "nap": True}},
        "seeds": [0], "stop": {"training_iteration": 2}, "checkpoint": {"replay": True},
        "diagnostics": {"plasticity": {"every": 2, "probe_size": 32}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "artifacts"),
                     "storage": str(tmp_path / "runs")},
    })
    assert result.num_errors == 0 and len(result.trials) == 1
    last = result.result_grid[0].metrics
    assert last["steps"] == 512  # 2 iterations of 4 chunks of 64 env steps (>= 200 each)
    for key in ("critic_loss", "policy_loss", "kl_penalty", "network_nap_max_norm_deviation", "policy_mean_abs",
                "policy_mean_out_of_bounds", "policy_mean_saturated"):
        assert key in last["learner"], sorted(last["learner"])
    assert last["learner"]["policy_mean_out_of_bounds"] == 0.0  # tanh_squash: the mean is tanh(μ_u)
    assert last["learner"]["network_nap_max_norm_deviation"] < 1e-5
    assert last["system"]["updates_per_s"] > 0 and last["env"]["num_env_steps_sampled_lifetime"] == 512
    plasticity = {k for k in last if k.startswith("plasticity/")} | set(last.get("plasticity", {}))
    assert any("dormant_ratio" in k for k in plasticity) and any("grad_l2" in k for k in plasticity), sorted(plasticity)
