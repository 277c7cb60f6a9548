"""EVE (epistemic Q-learning) on the off-policy core: maths against closed forms, exploration semantics,
and real RLlib runs on bsuite deep_sea with the bsuite scoring diagnostic."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.eve.exploration import (
    PosteriorExplorer,
    epsilon_greedy_actions,
    greedy_actions,
    linear_epsilon,
    perturbed_q_values,
    posterior_std,
)
from algorithms.eve.losses import (
    linearised_q_sample,
    nstep_q_targets,
    q_epistemic_variance,
    q_gradients,
    return_density_nll,
    sampled_q_targets,
)
from algorithms.networks import NetworkConfig, build_mlp
from algorithms.uncertainty import delta_variance, flatten_params, module_fn, module_params


def _net(norm: str = "none", seed: int = 0, hidden=(8, 8), in_dim: int = 5, out: int = 3):
    return build_mlp(in_dim, out, NetworkConfig(hidden=list(hidden), norm=norm), seed=seed).double()


# ---------------------------------------------------------------------------------------------
# losses
def test_return_density_nll_is_gaussian_negative_log_likelihood():
    q = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.5, -1.0, 0.0], dtype=torch.float64)
    sigma2 = 0.25
    loss, stats = return_density_nll(q, g, sigma2)
    # by hand: residuals 1, 0, -2 -> mean squared 5/3; NLL = 5/3 / (2 * 0.25) + 0.5 log(2 pi 0.25)
    expected = (5.0 / 3.0) / 0.5 + 0.5 * math.log(2 * math.pi * 0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    ref = -torch.distributions.Normal(q, math.sqrt(sigma2)).log_prob(g).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    loss.backward()
    assert torch.allclose(q.grad, -(g - q.detach()) / (3 * sigma2))
    assert stats["td_error_abs_mean"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="noise_var"):
        return_density_nll(q, g, 0.0)


def test_nstep_q_targets_q_learning_and_double_q():
    ret = torch.tensor([1.0, 0.5])
    disc = torch.tensor([0.9, 0.0])  # second transition is terminal: no bootstrap
    q_targ = torch.tensor([[1.0, 3.0], [7.0, 2.0]])
    q_online = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(nstep_q_targets(ret, disc, q_targ), torch.tensor([1.0 + 0.9 * 3.0, 0.5]))
    # double Q: the online net picks action 0 in the first state, the target net values it at 1.0
    assert torch.allclose(nstep_q_targets(ret, disc, q_targ, q_online), torch.tensor([1.0 + 0.9 * 1.0, 0.5]))


def test_sampled_q_targets_hand_cases_and_optimism():
    ret, disc = torch.tensor([1.0]), torch.tensor([0.5])
    q_targ = torch.tensor([[2.0, 1.0]])
    q_online = torch.tensor([[3.0, 0.0]])
    noise = torch.tensor([[0.0, 4.0]])  # the draw makes action 1 the sample's best
    # Q-learning on the sample: max(2, 5) = 5
    assert sampled_q_targets(ret, disc, q_targ, noise).item() == pytest.approx(1.0 + 0.5 * 5.0)
    # double Q on the sample: argmax(3 + 0, 0 + 4) = 1, valued by the sampled target 1 + 4 = 5
    assert sampled_q_targets(ret, disc, q_targ, noise, q_online).item() == pytest.approx(1.0 + 0.5 * 5.0)
    # double Q on the mean: argmax(3, 0) = 0, valued by the sampled target 2 + 0
    assert sampled_q_targets(ret, disc, q_targ, noise, q_online, argmax="mean").item() == pytest.approx(2.0)
    zero = torch.zeros(1, 2)
    assert sampled_q_targets(ret, disc, q_targ, zero, q_online).item() == nstep_q_targets(ret, disc, q_targ, q_online).item()
    # optimism in closed form: two equal values, independent N(0, s²) noise: E[max] = s / sqrt(pi)
    gen = torch.Generator().manual_seed(0)
    n, s_ = 200_000, 0.3
    noise = s_ * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    equal = torch.zeros(n, 2, dtype=torch.float64)
    ret, disc = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    sample = sampled_q_targets(ret, disc, equal, noise, equal.clone()).mean().item()
    mean = sampled_q_targets(ret, disc, equal, noise, equal.clone(), argmax="mean").mean().item()
    assert sample == pytest.approx(s_ / math.sqrt(math.pi), abs=4e-3)
    assert mean == pytest.approx(0.0, abs=4e-3)
    with pytest.raises(ValueError, match="argmax"):
        sampled_q_targets(ret, disc, equal, noise, argmax="max")


def test_sampled_q_targets_noise_clip_bounds_the_perturbation():
    ret, disc = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])
    q_targ = torch.tensor([[2.0, 1.0], [0.0, 0.5]])
    q_online = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    noise = torch.tensor([[0.0, 40.0], [-7.0, -0.25]])
    # clipped to [-1, 1]: row 0 noise (0, 1): double-Q argmax(3, 1) = 0, target 1 + 0.5 * (2 + 0) = 2;
    # row 1 noise (-1, -0.25): argmax(-1, -0.25) = 1, target 0 + 1 * (0.5 - 0.25) = 0.25
    clipped = sampled_q_targets(ret, disc, q_targ, noise, q_online, noise_clip=1.0)
    assert torch.allclose(clipped, torch.tensor([2.0, 0.25]))
    # unclipped, row 0 picks action 1: 1 + 0.5 * (1 + 40) = 21.5
    assert sampled_q_targets(ret, disc, q_targ, noise, q_online)[0].item() == pytest.approx(21.5)
    # a clip above every |noise| changes nothing
    assert torch.equal(sampled_q_targets(ret, disc, q_targ, noise, q_online, noise_clip=100.0),
                       sampled_q_targets(ret, disc, q_targ, noise, q_online))
    for bad in (0.0, -1.0, "1", True):
        with pytest.raises(ValueError, match="target_noise_clip.*None or a number > 0"):
            _eve_config("posterior", target_noise_clip=bad).validate()


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_fisher_on_the_loss_forward_pass_equals_per_example_gradients(norm):
    """The learner's path: mean_sq_grad_fast with retain_graph on a forward pass that the loss reuses."""
    from algorithms.uncertainty.fast import mean_sq_grad_fast_with_batch

    net = _net(norm)
    obs = torch.randn(7, 5, dtype=torch.float64)
    actions = torch.randint(3, (7,))
    captured = {}

    def q_taken(m):
        captured["q"] = m(obs)
        return captured["q"].gather(1, actions[:, None])[:, 0]

    mean_sq, batch = mean_sq_grad_fast_with_batch(net, q_taken, retain_graph=True)
    grads = q_gradients(module_fn(net), module_params(net), obs, actions)  # vmap + jacrev, [B, P]
    assert batch == 7 and torch.allclose(mean_sq, grads.square().mean(0), atol=1e-12)
    # brute force for one parameter entry: autograd per example
    first = next(net.parameters())
    brute = sum(torch.autograd.grad(net(obs[b : b + 1])[0, actions[b]], first)[0].square() for b in range(7))
    assert torch.allclose(mean_sq[: first.numel()], brute.reshape(-1) / 7, atol=1e-12)
    # the captured forward pass still has its graph: a loss backpropagates through it
    q = captured["q"]
    assert torch.allclose(q.detach(), net(obs))
    q.gather(1, actions[:, None]).sum().backward()
    assert torch.allclose(first.grad, sum(torch.autograd.grad(net(obs[b : b + 1])[0, actions[b]], first)[0]
                                          for b in range(7)), atol=1e-12)
    with pytest.raises(RuntimeError):  # without retain_graph the graph is freed after the Fisher's pass
        captured.clear()
        mean_sq_grad_fast_with_batch(net, q_taken)
        captured["q"].sum().backward()


def test_linearised_q_sample_mean_variance_and_linear_case():
    # a network linear in θ (no hidden layer): the linearised sample is the perturbed network itself
    lin = _net(hidden=())
    delta = torch.randn(flatten_params(module_params(lin)).numel(), dtype=torch.float64)
    obs = torch.randn(4, 5, dtype=torch.float64)
    perturbed = build_mlp(5, 3, NetworkConfig(hidden=[])).double()
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(lin.parameters()) + delta,
                                        perturbed.parameters())
    assert torch.allclose(linearised_q_sample(lin, obs, delta), perturbed(obs), atol=1e-12)
    # a ReLU network: Q + J δ with J from per-example Jacobians; over δ ~ N(0, Σ) its variance is J Σ Jᵀ
    net = _net()
    params = module_params(net)
    cov = torch.rand(flatten_params(params).numel(), dtype=torch.float64) * 0.01
    delta = cov.sqrt() * torch.randn(cov.numel(), dtype=torch.float64)
    actions = torch.tensor([0, 1, 2, 0])
    grads = q_gradients(module_fn(net), params, obs, actions)
    sample = linearised_q_sample(net, obs, delta).gather(1, actions[:, None]).squeeze(1)
    assert torch.allclose(sample, net(obs).gather(1, actions[:, None]).squeeze(1) + grads @ delta, atol=1e-12)
    draws = torch.stack([linearised_q_sample(net, obs, cov.sqrt() * torch.randn(cov.numel(), dtype=torch.float64))
                         for _ in range(2000)]).gather(2, actions[None, :, None].expand(2000, 4, 1)).squeeze(2)
    assert torch.allclose(draws.var(0), q_epistemic_variance(grads, cov, params), rtol=0.15)


def test_per_action_heads_share_no_parameters_and_work_with_the_fast_paths(monkeypatch):
    """q_heads="per_action" (one grouped network of A towers): Q(s, a) depends only on tower a; the Fisher fast
    path equals per-example gradients; the linearised sample equals Q + J δ without the torch.func.jvp fallback;
    an uncorrelated gap: Var[Q_1 − Q_0] = Var[Q_0] + Var[Q_1]."""
    from algorithms.networks import build_grouped_mlp
    from algorithms.uncertainty.fast import linearised_forward, mean_sq_grad_fast

    torch.manual_seed(0)
    for block in (NetworkConfig(hidden=[8]), NetworkConfig(hidden=[8], activation="elu", norm="layer")):
        net = build_grouped_mlp(5, 2, 1, block).double()
        params = module_params(net)
        obs = torch.randn(6, 5, dtype=torch.float64)
        g0 = q_gradients(module_fn(net), params, obs, torch.zeros(6, dtype=torch.long))
        g1 = q_gradients(module_fn(net), params, obs, torch.ones(6, dtype=torch.long))
        assert (g0 * g1 == 0).all() and g0.abs().sum() > 0 and g1.abs().sum() > 0  # disjoint supports
        cov = torch.rand(g0.shape[1], dtype=torch.float64)
        var_gap = q_epistemic_variance(g1 - g0, cov, params)
        assert torch.allclose(var_gap, q_epistemic_variance(g0, cov, params) + q_epistemic_variance(g1, cov, params))
        actions = torch.tensor([0, 1, 1, 0, 1, 0])
        fisher = mean_sq_grad_fast(net, lambda m, obs=obs, actions=actions: m(obs).gather(1, actions[:, None]).squeeze(1))
        per_example = torch.where(actions[:, None] == 0, g0, g1)
        assert torch.allclose(fisher, per_example.square().mean(0))
        delta = torch.randn(g0.shape[1], dtype=torch.float64)
        monkeypatch.setattr(torch.func, "jvp", lambda *a, **k: pytest.fail("linearised_forward fell back to jvp"))
        q, dq = linearised_forward(net, obs, delta)
        monkeypatch.undo()
        assert torch.allclose(q, net(obs)) and torch.allclose(dq, torch.stack([g0 @ delta, g1 @ delta], 1))
    with pytest.raises(ValueError, match="q_heads"):
        _eve_config("posterior", q_heads="tree").validate()


def test_norm_option_builds_the_normalised_q_network_on_runner_and_learner():
    """EVEConfig.norm reaches the module through model_config: LayerNorm before the activation, no bias
    in the normalised layer, on both the runner's and the learner's copy; unknown values are rejected."""
    from algorithms.eve.config import EVEConfig
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    cfg = (EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=0)
           .training(norm="layer", hidden=[16], q_heads="shared"))
    runner, learner = _runner_and_learner(cfg)
    for module in (runner.module, learner.module["default_policy"].unwrapped()):
        block = module.q.blocks[0]
        assert isinstance(block.norm, torch.nn.LayerNorm) and block.layer.bias is None
        assert block.layer.out_features == 16
    # the defaults: one LayerNorm MLP per action, run as one grouped network
    from algorithms.networks import GroupedMLP, GroupedNorm

    default = _runner_and_learner(EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=0))[0]
    assert isinstance(default.module.q, GroupedMLP) and default.module.q.groups == 2
    assert isinstance(default.module.q.blocks[0].norm, GroupedNorm) and default.module.q.blocks[0].layer.bias is None
    plain = _runner_and_learner(EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=0)
                                .training(norm="none", q_heads="shared"))[0]
    assert not isinstance(getattr(plain.module.q.blocks[0], "norm", None), torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm: got 'batch'; allowed: none, layer, rms"):
        _eve_config("posterior", norm="batch").validate()


def test_q_epistemic_variance_is_the_delta_variance():
    net = _net()
    params = module_params(net)
    obs = torch.randn(4, 5, dtype=torch.float64)
    actions = torch.tensor([0, 2, 1, 1])
    cov = torch.rand(flatten_params(params).numel(), dtype=torch.float64) + 0.1
    grads = q_gradients(module_fn(net), params, obs, actions)
    ours = q_epistemic_variance(grads, cov, params)

    def q_a(p, s, a):
        return torch.func.functional_call(net, p, (s.unsqueeze(0),)).squeeze(0).gather(0, a.reshape(1)).squeeze(0)

    ref = delta_variance(q_a, params, (obs, actions), cov)
    assert torch.allclose(ours, ref, atol=1e-12)
    # by hand for the first query: sum_p g_p^2 cov_p
    assert ours[0].item() == pytest.approx(float((grads[0] ** 2 * cov).sum()), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# exploration
def test_epsilon_greedy_and_schedule():
    q = torch.tensor([[0.0, 1.0, 0.0]] * 2000)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(epsilon_greedy_actions(q, 0.0, g), torch.ones(2000, dtype=torch.long))
    a = epsilon_greedy_actions(q, 0.3, g)
    # greedy w.p. 0.7 + 0.3/3
    assert (a == 1).float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert linear_epsilon(0, 1.0, 0.1, 100) == 1.0
    assert linear_epsilon(50, 1.0, 0.1, 100) == pytest.approx(0.55)
    assert linear_epsilon(500, 1.0, 0.1, 100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_greedy_actions(q, 1.5, g)


def test_posterior_sampling_changes_actions_only_through_the_perturbation():
    torch.manual_seed(0)
    net = _net(hidden=(16,)).float()
    params = module_params(net)
    fisher = torch.rand(flatten_params(params).numel())
    obs = torch.randn(6, 5)
    greedy = greedy_actions(net(obs)).tolist()
    for env in range(6):
        # scale 0: θ̃ = θ̂ exactly
        ex = PosteriorExplorer(net, 1, seed=env, scale=0.0)
        ex.set_posterior(params, fisher, num_data=10, damping=1.0)
        assert ex.act(obs[env : env + 1]).tolist() == [greedy[env]]
        # a zero-variance posterior (precision -> infinity) gives the greedy actions too
        ex = PosteriorExplorer(net, 1, seed=env, scale=1.0)
        ex.set_posterior(params, torch.ones_like(fisher), num_data=1e30, damping=1.0)
        assert ex.act(obs[env : env + 1]).tolist() == [greedy[env]]
    # a wide posterior changes some actions, and the actions are greedy on the sample: the network at θ̃
    # ("parameters") or its first-order expansion Q_θ̂ + J (θ̃ − θ̂) ("linearised")
    ex = PosteriorExplorer(net, 6, seed=1, scale=1.0, perturbation="parameters")
    ex.set_posterior(params, torch.zeros_like(fisher), num_data=0, damping=1e-2)
    acts = ex.act(obs)
    assert acts.tolist() != greedy
    assert torch.equal(acts, greedy_actions(perturbed_q_values(module_fn(net), params, ex.samples, obs)))
    lin = PosteriorExplorer(net, 6, seed=1, scale=1.0)
    lin.set_posterior(params, torch.zeros_like(fisher), num_data=0, damping=1e-2)
    acts = lin.act(obs)
    assert acts.tolist() != greedy
    q_lin = torch.stack([linearised_q_sample(net, obs[e : e + 1], lin.deltas[e])[0] for e in range(6)])
    assert torch.equal(acts, greedy_actions(q_lin))
    assert torch.equal(lin.samples, ex.samples)  # same seed, same draws
    # the perturbation is θ̃ − θ̂ = std ⊙ ε with std = (N F + λ)^{-1/2}
    std = posterior_std(torch.zeros_like(fisher), 0, 1e-2)
    assert torch.allclose(std, torch.full_like(std, 10.0))


def test_per_episode_resampling():
    net = _net(hidden=(4,)).float()
    params = module_params(net)
    fisher = torch.zeros(flatten_params(params).numel())
    ex = PosteriorExplorer(net, 2, seed=3)
    ex.set_posterior(params, fisher, num_data=0, damping=1.0)
    obs = torch.randn(2, 5)
    ex.act(obs)
    first = ex.samples.clone()
    for _ in range(5):
        ex.act(obs)  # same episode: same samples, even when new weights arrive
        ex.set_posterior(params, fisher, num_data=5, damping=1.0)
    assert torch.equal(ex.samples, first) and ex.num_samples == 2
    ex.episode_started(torch.tensor([False, True]))  # env 1 starts a new episode
    ex.act(obs)
    assert torch.equal(ex.samples[0], first[0]) and not torch.equal(ex.samples[1], first[1])
    assert ex.num_samples == 3
    # same seed, same stream of samples
    again = PosteriorExplorer(net, 2, seed=3)
    again.set_posterior(params, fisher, num_data=0, damping=1.0)
    again.act(obs)
    assert torch.equal(again.samples, first)
    # every-k-steps mode
    steps = PosteriorExplorer(net, 1, seed=0, resample="steps", every=3)
    steps.set_posterior(params, fisher, num_data=0, damping=1.0)
    for _ in range(7):
        steps.act(obs[:1])
    assert steps.num_samples == 3  # draws at steps 1, 4, 7
    with pytest.raises(ValueError, match="resample"):
        PosteriorExplorer(net, 1, seed=0, resample="never")


# ---------------------------------------------------------------------------------------------
# RLlib: EVE on the off-policy core, bsuite scoring
def _eve_config(exploration: str, *, env: str = "bsuite/deep_sea-0", seed: int = 0, runners: int = 0, **training):
    from algorithms.diagnostics.rllib_bsuite import BsuiteSettings, make_bsuite_callback
    from algorithms.eve.config import EVEConfig
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    return (EVEConfig().environment(env).env_runners(num_env_runners=runners).debugging(seed=seed)
            .training(exploration=exploration, **training).callbacks(make_bsuite_callback(BsuiteSettings())))


PAPER_NETWORK = {"q_heads": "shared", "norm": "none", "prior_precision": 1.0, "target_noise_clip": None}
"""EVE's Q network and prior before 2026-11-26: one MLP with A outputs (the paper's), no norm, λ = 1."""


def _train_until_done(algo, max_iters: int) -> dict:
    result: dict = {}
    for _ in range(max_iters):
        result = algo.train()
        if result.get("done"):
            break
    return result


@pytest.mark.slow
def test_eve_solves_deep_sea_10_where_epsilon_greedy_does_not(ray_local):
    """bsuite deep_sea/0 (size 10), same seed and settings; only config.exploration differs. The run
    stops when solved (bsuite's rule) or after 2^10 + 100 = 1124 episodes. Both arms use the paper's
    single Q-MLP (one [64] ELU torso with A outputs, no norm, λ = 1, no target clip): with the defaults'
    per-action LayerNorm towers the epsilon-greedy baseline solves size 10 too (seed 0 at episode 400,
    size 14 at 3,000: an untried action keeps its initial value, which acts as optimistic initialisation),
    so that network separates the two only at sizes too slow for the suite (benchmarks/README.md)."""
    torch.set_num_threads(1)
    outcome = {}
    for exploration in ("posterior", "epsilon_greedy"):
        algo = _eve_config(exploration, **PAPER_NETWORK).build_algo()
        try:
            result = _train_until_done(algo, max_iters=15)
        finally:
            algo.stop()
        ex = result["exploration"]
        assert result["done"] and ex["deep_sea_finished"] == 1.0
        outcome[exploration] = ex
        if exploration == "posterior":
            assert result["uncertainty"]["q_epistemic_std"] > 0
            assert result["uncertainty"]["num_data"] == result["num_env_steps_sampled_lifetime"]
    assert outcome["posterior"]["deep_sea/solved/size_10"] == 1.0
    assert outcome["posterior"]["bsuite_score"] == 1.0
    assert outcome["posterior"]["deep_sea/solved_episode/size_10"] < 1124
    assert outcome["epsilon_greedy"]["deep_sea/solved/size_10"] == 0.0
    assert outcome["epsilon_greedy"]["bsuite_score"] == 0.0
    assert outcome["epsilon_greedy"]["deep_sea/episodes/size_10"] == 1124


def test_save_restore_continues_exactly_with_two_env_runners(ray_local, tmp_path):
    """Two remote env runners with per-runner posterior samples; a restored algorithm continues with the
    same weights, Fisher, posterior samples and bsuite log as the uninterrupted one."""
    from ray.rllib.algorithms.algorithm import Algorithm

    def build():
        cfg = _eve_config("posterior", runners=2, checkpoint_replay=True, learning_starts=50)
        cfg.reporting(min_sample_timesteps_per_iteration=200)
        return cfg.build_algo()

    a = build()
    try:
        a.train()
        path = a.save(str(tmp_path / "ckpt")).checkpoint.path
        r_a = a.train()
        w_a = a.learner_group.get_weights()["default_policy"]
        fisher_a = a.learner_group._learner.fisher.fisher.clone()
    finally:
        a.stop()
    b = Algorithm.from_checkpoint(path)
    try:
        assert b.learner_group._learner.fisher.steps > 0
        r_b = b.train()
        w_b = b.learner_group.get_weights()["default_policy"]
        assert torch.equal(b.learner_group._learner.fisher.fisher, fisher_a)
    finally:
        b.stop()
    for k in w_a:
        assert torch.allclose(torch.as_tensor(w_a[k]), torch.as_tensor(w_b[k])), k
    assert r_a["num_env_steps_sampled_lifetime"] == r_b["num_env_steps_sampled_lifetime"]
    assert r_a["exploration"]["deep_sea/episodes/size_10"] == r_b["exploration"]["deep_sea/episodes/size_10"]
    assert r_a["uncertainty"]["q_epistemic_std"] == pytest.approx(r_b["uncertainty"]["q_epistemic_std"])


def test_bsuite_scores_for_rllib_ppo_and_eve_through_a_spec(ray_local, tmp_path):
    """The `bsuite` diagnostic through orchestration.run: RLlib's PPO (its own env runners) on
    discounting_chain gets credit/bsuite_score; EVE on umbrella_length gets it through the core's runner;
    both land in MLflow with the uncertainty keys for EVE."""
    from mlflow import MlflowClient

    from orchestration.runner import run

    t = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "artifacts"),
         "storage": str(tmp_path / "runs")}
    ppo = run({"name": "eve_bsuite_ppo", "algorithm": "PPO", "env": "bsuite/discounting_chain-0",
               "config": {"train_batch_size_per_learner": 500, "minibatch_size": 250, "num_epochs": 1,
                          "num_env_runners": 0},
               "diagnostics": {"bsuite": {}}, "stop": {"training_iteration": 1}, "tracking": t})
    eve = run({"name": "eve_bsuite_eve", "algorithm": "EVE", "env": "bsuite/umbrella_length-0",
               "config": {"min_sample_timesteps_per_iteration": 300, "num_env_runners": 0,
                          "exploration": {"grid": ["posterior", "epsilon_greedy"]}},
               "diagnostics": {"bsuite": {}}, "stop": {"training_iteration": 1}, "tracking": t})
    assert ppo.num_errors == 0 and eve.num_errors == 0
    client = MlflowClient(t["uri"])
    for name, keys in (("eve_bsuite_ppo", ["credit/bsuite_score", "credit/bsuite_score/discounting_chain",
                                           "credit/discounting_chain/regret/mapping_seed_0"]),
                       ("eve_bsuite_eve", ["credit/bsuite_score", "credit/umbrella_length/regret/chain_length_1"])):
        exp = client.get_experiment_by_name(name)
        children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        assert children
        for child in children:
            metrics = child.data.metrics
            for key in keys:
                assert key in metrics, (name, key, sorted(metrics))
            assert 0.0 <= metrics["credit/bsuite_score"] <= 1.0
            if name == "eve_bsuite_eve" and child.data.params.get("exploration") == "posterior":
                assert metrics["uncertainty/q_epistemic_std"] > 0


def _runner_and_learner(cfg):
    """EVE's env runner and learner built from ``cfg`` without Ray (the core's objects, in-process)."""
    from algorithms.offpolicy.inprocess import build_runner_and_learner

    return build_runner_and_learner(cfg)


def _core_step(runner, learner, cfg, num_timesteps: int) -> None:
    from algorithms.offpolicy.inprocess import core_step

    core_step(runner, learner, cfg, num_timesteps)


def test_runner_and_learner_wiring_without_ray():
    """EVE's env runner and learner on deep_sea without an Algorithm: the learner's Fisher and N reach
    the runner with the weights, each episode draws one perturbation, the Delta-Variance report is
    positive, bsuite episodes are recorded, and the baseline tracks no Fisher."""

    from algorithms.eve.config import EVEConfig
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    for exploration in ("posterior", "epsilon_greedy"):
        cfg = EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=0).training(exploration=exploration)
        runner, learner = _runner_and_learner(cfg)
        runner.record_bsuite_episodes = True
        for _ in range(50):  # 200 env steps = 20 episodes of deep_sea size 10
            _core_step(runner, learner, cfg, 4)
        assert learner.replay.num_env_steps == 200 and learner.num_updates == (200 - 100) * 16 // 32
        episodes = runner.metrics.peek("bsuite_episodes")
        assert len(episodes) == 20 and all(e["bsuite_id"] == "deep_sea/0" for e in episodes)
        if exploration == "posterior":
            assert float(runner.module.num_data) == 200
            assert torch.equal(runner.module.fisher_diag, learner.fisher.fisher)
            assert float(runner.module.fisher_diag.max()) > 0
            assert runner.explorer.num_samples == 10  # one draw per episode after the 100-step (10-episode) burn-in
            stats = learner.uncertainty_stats()
            assert stats["q_epistemic_std"] > 0 and stats["num_data"] == 200
        else:
            assert float(runner.module.fisher_diag.abs().sum()) == 0 and learner.uncertainty_stats() == {}


@pytest.mark.parametrize("q_heads", ["per_action", "shared"])
def test_loss_gradient_from_the_fisher_pass_equals_autograd(q_heads):
    """With posterior tracking the learner takes the Fisher and the loss gradient from one hand-written reverse
    pass (``mean_sq_grad_fast_and_vjp_selected``): on the same batch and generator state they equal the hooked
    autograd Fisher and loss.backward()'s gradient (``hand_gradients=False``), and the loss is the same."""
    import copy

    from algorithms.eve.config import EVEConfig
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    cfg = EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=0).training(q_heads=q_heads)
    runner, learner = _runner_and_learner(cfg)
    for _ in range(40):
        _core_step(runner, learner, cfg, 4)
    batch = {"default_policy": learner.replay.sample(32)}
    gen, fisher = learner.generator.get_state(), copy.deepcopy(learner.fisher.state_dict())
    results = {}
    for hand in (True, False):
        learner.generator.set_state(gen)
        learner.fisher.load_state_dict(copy.deepcopy(fisher))
        learner.hand_gradients = hand
        losses = learner.compute_losses(fwd_out={"default_policy": {}}, batch=batch)
        grads = learner.compute_gradients(losses)
        results[hand] = (float(losses["default_policy"].detach()), {k: g.clone() for k, g in grads.items()},
                         learner.fisher.fisher.clone())
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    torch.testing.assert_close(results[True][2], results[False][2], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys() and len(results[True][1]) >= 3
    for key, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], grad, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 1e-4 for g in results[False][1].values())


@pytest.mark.slow
def test_eve_defaults_solve_deep_sea_10_for_three_seeds_without_ray():
    """EVE's defaults, seeds 0, 1 and 2: EVE's own runner and learner in the core's order (sample one
    step, insert, the updates due, sync), stopped when solved by bsuite's rule or after the
    2^10 + 100 = 1124-episode budget. Before target_argmax="sample" seed 1 failed."""

    from algorithms.diagnostics.bsuite_scoring import BsuiteEpisodeLog, deep_sea_episode_budget
    from algorithms.eve.config import EVEConfig
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    for seed in (0, 1, 2):
        cfg = EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=seed)
        runner, learner = _runner_and_learner(cfg)
        log = BsuiteEpisodeLog()
        while not log.solved("deep_sea/0") and log.num_episodes("deep_sea/0") < deep_sea_episode_budget(10):
            _core_step(runner, learner, cfg, 1)
            for env in runner.envs:
                for record in env.drain():
                    log.add_info(record["bsuite_id"], record)
        assert log.solved("deep_sea/0"), (seed, log.metrics())
        assert log.solved_episode("deep_sea/0") < 1124
