"""Networks: builders, NaP, decoupled weight decay, LR schedules, and the RLlib module/learner adapters."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from algorithms.networks import (
    NetworkConfig,
    build_cnn,
    build_mlp,
    group_norm,
    lr_multiplier,
    named_hidden_activations,
    nap_groups,
    nap_initial_norms,
    nap_project_,
    network_updates,
    project_to_norm_,
    warmup_cosine_multiplier,
)
from algorithms.networks.config import LRScheduleConfig
from algorithms.networks.updates import LRSchedule, NaP

torch.set_num_threads(1)  # tiny networks: extra threads only contend on the shared 2-core machine


def _regression_batch(seed: int, n: int = 32, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g) * 5


# --- builders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, norm_type", [("layer", nn.LayerNorm), ("rms", nn.Module)])
def test_norm_before_activation_removes_hidden_bias(norm, norm_type):
    net = build_mlp(8, 3, NetworkConfig(hidden=[16, 16], norm=norm, activation="tanh"), seed=0)
    assert len(net.hidden_layers()) == 2
    for block in net.blocks:
        assert block.layer.bias is None  # the norm's offset takes the bias's role
        assert isinstance(block.norm, norm_type) and not isinstance(block.norm, nn.Identity)
        assert isinstance(block.act, nn.Tanh)
        assert list(dict(block.named_children())) == ["layer", "norm", "act"]  # norm BEFORE nonlinearity
    assert net.output.bias is not None  # the output layer keeps its bias
    plain = build_mlp(8, 3, NetworkConfig(hidden=[16]), seed=0)
    assert plain.blocks[0].layer.bias is not None and isinstance(plain.blocks[0].norm, nn.Identity)
    assert net.normalised_layers() == ["blocks.0.layer", "blocks.1.layer"]
    assert plain.normalised_layers() == []


def test_cnn_channels_last_and_hidden_layers():
    cfg = NetworkConfig(hidden=[32], norm="layer", cnn={"channels": [8, 4], "kernel": 3, "stride": [1, 2]})
    net = build_cnn((10, 10, 4), 5, cfg, seed=1)
    x = torch.rand(2, 10, 10, 4)
    assert net(x).shape == (2, 5)
    # 10 -> 8 (k3 s1) -> 3 (k3 s2); flatten 4*3*3 = 36
    assert net.blocks[0].layer.in_features == 36
    assert [type(m).__name__ for m in net.hidden_layers()] == ["Conv2d", "Conv2d", "Linear"]
    assert all(m.bias is None for m in net.hidden_layers())
    assert set(nap_groups(net)) == {
        "convs.0.layer.weight", "convs.1.layer.weight", "blocks.0.layer.weight",
        "convs.0.norm", "convs.1.norm", "blocks.0.norm",
    }  # fmt: skip
    with pytest.raises(ValueError, match="kernel"):
        build_cnn((2, 2, 1), 5, NetworkConfig(cnn={"channels": [4], "kernel": 3}))


def test_hidden_activations_are_hookable_modules():
    net = build_mlp(8, 3, NetworkConfig(hidden=[16, 12], activation="gelu"), seed=0)
    wrapper = nn.ModuleDict({"policy": net})
    acts = named_hidden_activations(wrapper)
    assert list(acts) == ["policy.blocks.0.act", "policy.blocks.1.act"]
    seen = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape)) for n, m in acts.items()]
    wrapper["policy"](torch.zeros(5, 8))
    for h in handles:
        h.remove()
    assert seen == {"policy.blocks.0.act": (5, 16), "policy.blocks.1.act": (5, 12)}


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    cfg = NetworkConfig(hidden=[16])
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_mlp(4, 2, cfg, seed=7)
    assert torch.equal(torch.rand(1), expected)
    b = build_mlp(4, 2, cfg, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_config_values_name_the_key():
    with pytest.raises(ValidationError, match="activation"):
        NetworkConfig(activation="sigmoid")
    with pytest.raises(ValidationError, match="norm"):
        NetworkConfig(norm="batch")
    with pytest.raises(ValidationError, match="extra"):
        NetworkConfig(hiden=[4])
    with pytest.raises(ValidationError, match="total_steps"):
        LRScheduleConfig(kind="warmup_cosine", warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="task_length"):
        network_updates(NetworkConfig(lr_schedule={"kind": "warmup_cosine", "restart_at_task_boundary": True}))


# --- Normalize-and-Project ------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_nap_keeps_hidden_norms_at_initial_values_over_100_adam_steps(norm):
    cfg = NetworkConfig(hidden=[32, 32], norm=norm, nap=True)
    net = build_mlp(8, 1, cfg, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    updates = network_updates(cfg)
    updates.init(net, opt)
    init = nap_initial_norms(net)
    assert len(init) == 4  # two hidden weights, two norm layers (scale and offset jointly)
    w0 = net.blocks[0].layer.weight.detach().clone()
    out0 = net.output.weight.detach().norm()
    for step in range(100):
        x, y = _regression_batch(step)
        updates.before_step(net, opt, step)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        updates.after_step(net, opt, step)
        for name, params in nap_groups(net).items():
            assert float(group_norm(params)) == pytest.approx(init[name], rel=1e-6), (step, name)
    assert (net.blocks[0].layer.weight - w0).norm() > 0.1 * w0.norm()  # it did train
    assert net.output.weight.detach().norm() != pytest.approx(float(out0), rel=1e-3)  # output not projected


def test_without_nap_adam_grows_scale_invariant_weights():
    """The failure NaP addresses: norms drift away from their initial values under plain training."""
    cfg = NetworkConfig(hidden=[32, 32], norm="layer")
    net = build_mlp(8, 1, cfg, seed=0)
    init = nap_initial_norms(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(100):
        x, y = _regression_batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    w = net.blocks[1].layer.weight
    assert float(w.detach().norm()) > 1.2 * init["blocks.1.layer.weight"]


def test_projection_leaves_function_unchanged_for_scale_invariant_layers():
    cfg = NetworkConfig(hidden=[32, 32], norm="layer", activation="relu")
    net = build_mlp(8, 3, cfg, seed=0).double()
    init = nap_initial_norms(net)
    with torch.no_grad():  # simulate norm growth: scale each hidden weight by a different factor
        net.blocks[0].layer.weight.mul_(3.7)
        net.blocks[1].layer.weight.mul_(2.0)
    x = _regression_batch(0)[0].double()
    before = net(x)
    for name, params in nap_groups(net).items():
        if name.endswith(".weight"):  # the hidden weights, each followed by a LayerNorm
            project_to_norm_(params, init[name])
    # Equal up to the LayerNorm's ε (1e-5 added to the variance), which breaks exact invariance.
    assert torch.allclose(net(x), before, rtol=1e-4, atol=1e-6)
    assert float(net.blocks[0].layer.weight.detach().norm()) == pytest.approx(init["blocks.0.layer.weight"], rel=1e-6)
    # ... while the same projection on an unnormalised network changes its function
    plain = build_mlp(8, 3, NetworkConfig(hidden=[32, 32]), seed=0)
    init_plain = nap_initial_norms(plain)
    with torch.no_grad():
        plain.blocks[0].layer.weight.mul_(3.7)
    x = x.float()
    before_plain = plain(x)
    nap_project_(plain, init_plain)
    assert not torch.allclose(plain(x), before_plain, atol=1e-3)


@pytest.mark.parametrize("hidden, norm, activation", [([8], "layer", "elu"), ([8, 6], "none", "relu"),
                                                        ([8, 6], "rms", "tanh"), ([], "none", "relu")])
def test_grouped_mlp_equals_separate_towers_and_projects_each_tower(hidden, norm, activation):
    """build_grouped_mlp(D, G, O) is G build_mlp(D, O) towers side by side: same draws, same outputs
    (columns g·O...), no parameter shared (a tower's output ignores another tower's weights); hidden
    activations are hookable with G·H units; NaP projects each tower's weight (and norm) on its own."""
    from algorithms.networks import build_grouped_mlp

    cfg = NetworkConfig(hidden=hidden, norm=norm, activation=activation)
    torch.manual_seed(3)
    towers = [build_mlp(5, 2, cfg).double() for _ in range(3)]
    torch.manual_seed(3)
    net = build_grouped_mlp(5, 3, 2, cfg).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(net(x), torch.cat([t(x) for t in towers], -1), rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for t in towers for p in t.parameters())
    with torch.no_grad():
        net.output.weight[1].add_(1.0)  # tower 1's output layer: columns 2, 3 move, the others do not
    out = net(x)
    torch.testing.assert_close(out[:, [0, 1, 4, 5]], torch.cat([towers[0](x), towers[2](x)], -1))
    assert not torch.allclose(out[:, 2:4], towers[1](x))
    if not hidden:
        return
    acts = named_hidden_activations(net)
    assert list(acts) == [f"blocks.{i}.act" for i in range(len(hidden))]
    from algorithms.diagnostics.plasticity import normalised_layers, weight_layers

    assert list(weight_layers(net)) == [f"blocks.{i}.layer" for i in range(len(hidden))] + ["output"]
    assert normalised_layers(net) == ([] if norm == "none" else [f"blocks.{i}.layer" for i in range(len(hidden))])
    seen = []
    handle = acts["blocks.0.act"].register_forward_hook(lambda _m, _i, o: seen.append(o.shape))
    net(x)
    handle.remove()
    assert seen == [torch.Size([7, 3 * hidden[0]])]
    init = nap_initial_norms(net)
    assert f"blocks.0.layer.weight[{2}]" in init and len([k for k in init if ".layer.weight[" in k]) == 3 * len(hidden)
    assert init["blocks.0.layer.weight[1]"] == pytest.approx(float(towers[1].blocks[0].layer.weight.detach().norm()))
    if norm != "none":
        assert init["blocks.0.norm[0]"] == pytest.approx(float(group_norm(list(towers[0].blocks[0].norm.parameters()))))
    with torch.no_grad():
        net.blocks[0].layer.weight[0].mul_(3.0)
        net.blocks[0].layer.weight[2].mul_(0.5)
    nap_project_(net, init)
    for g in range(3):
        assert float(net.blocks[0].layer.weight[g].detach().norm()) == pytest.approx(init[f"blocks.0.layer.weight[{g}]"])
    if norm != "none":  # scale-invariant per tower: the projection restores each tower's function
        torch.testing.assert_close(net.double()(x)[:, :2], towers[0](x), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        build_grouped_mlp(5, 0, 1, cfg)


def test_effective_learning_rate_of_scale_invariant_layer_is_eta_over_norm_squared():
    """SGD on L(LN(Wx)): the direction Ŵ moves with η_eff = ‖ΔŴ‖/‖∇_Ŵ L‖ = η/‖W‖² (Lyle et al. 2024)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    target = torch.randn(64, 5, generator=g, dtype=torch.float64)
    w_base = torch.randn(5, 6, generator=g, dtype=torch.float64)
    eta = 1e-4
    for scale in (0.5, 1.0, 2.0, 4.0):
        w = (scale * w_base).clone().requires_grad_(True)
        loss = (nn.functional.layer_norm(x @ w.T, (5,), eps=1e-12) - target).pow(2).mean()  # exactly invariant
        (grad,) = torch.autograd.grad(loss, w)
        # Scale invariance: the gradient is orthogonal to W and shrinks as 1/scale.
        assert abs(float((grad * w).sum())) < 1e-9 * float(grad.norm() * w.norm())
        w_new = w.detach() - eta * grad
        norm = float(w.detach().norm())
        d_dir = (w_new / w_new.norm() - w.detach() / norm).norm()
        grad_dir = norm * grad.norm()  # ∇_Ŵ L = ‖W‖ ∇_W L
        measured = float(d_dir / grad_dir)
        assert measured == pytest.approx(eta / norm**2, rel=1e-3)


def test_nap_every_k_projects_only_on_multiples():
    net = build_mlp(8, 1, NetworkConfig(hidden=[16], norm="layer"), seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    nap = NaP(every=3)
    nap.init(net, opt)
    key = "blocks.0.layer.weight"
    for step in range(6):
        with torch.no_grad():
            net.blocks[0].layer.weight.mul_(1.5)
        nap.after_step(net, opt, step)
        at_init = float(net.blocks[0].layer.weight.norm()) == pytest.approx(nap.init_norms[key], rel=1e-6)
        assert at_init == ((step + 1) % 3 == 0)


def test_nap_skips_frozen_target_copies():
    import copy

    online = build_mlp(8, 1, NetworkConfig(hidden=[16], norm="layer"), seed=0)
    target = copy.deepcopy(online).requires_grad_(False)
    both = nn.ModuleDict({"online": online, "target": target})
    assert set(nap_groups(both)) == {"online.blocks.0.layer.weight", "online.blocks.0.norm"}


# --- weight decay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l2", "l2_init"])
def test_decoupled_weight_decay_one_step_closed_form(kind):
    eta, lam = 0.1, 0.5
    cfg = NetworkConfig(hidden=[4], weight_decay={"kind": kind, "coef": lam})
    net = build_mlp(3, 2, cfg, seed=0)
    theta0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=eta)
    updates = network_updates(cfg)
    updates.init(net, opt)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    updates.before_step(net, opt, 0)
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    grads = [p.grad.detach().clone() for p in net.parameters()]
    opt.step()
    updates.after_step(net, opt, 0)
    for p, t0, g in zip(net.parameters(), theta0, grads):
        sgd = t0 - eta * g
        ref = torch.zeros_like(t0) if kind == "l2" else t0
        expected = sgd - eta * lam * (sgd - ref)  # θ1 = θ' − ηλ(θ' − θ_ref)
        assert torch.allclose(p.detach(), expected, atol=1e-7)


def test_l2_init_keeps_weights_at_init_without_gradients():
    cfg = NetworkConfig(hidden=[4], weight_decay={"kind": "l2_init", "coef": 1.0})
    net = build_mlp(3, 2, cfg, seed=0)
    theta0 = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    updates = network_updates(cfg)
    updates.init(net, opt)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for step in range(10):  # no gradient: θ − θ0 shrinks by (1 − ηλ) per step
        updates.after_step(net, opt, step)
    for p, t0 in zip(net.parameters(), theta0):
        assert torch.allclose(p.detach() - t0, torch.full_like(t0, 0.9**10), atol=1e-6)


# --- learning-rate schedules ---------------------------------------------------------------------------


def test_warmup_cosine_values_at_hand_computed_steps():
    w, t, f = 10, 110, 0.1
    assert warmup_cosine_multiplier(0, w, t, f) == pytest.approx(0.1)  # (0+1)/10
    assert warmup_cosine_multiplier(4, w, t, f) == pytest.approx(0.5)
    assert warmup_cosine_multiplier(9, w, t, f) == pytest.approx(1.0)
    assert warmup_cosine_multiplier(10, w, t, f) == pytest.approx(1.0)  # cosine starts at its peak
    assert warmup_cosine_multiplier(60, w, t, f) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(π/2) = 0
    assert warmup_cosine_multiplier(35, w, t, f) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine_multiplier(110, w, t, f) == pytest.approx(0.1)
    assert warmup_cosine_multiplier(500, w, t, f) == pytest.approx(0.1)  # held after T


def test_schedule_restarts_at_task_boundaries_and_sets_optimizer_lr():
    cfg = LRScheduleConfig(kind="warmup_cosine", warmup_steps=10, final_fraction=0.0,
                           restart_at_task_boundary=True, task_length=110)  # fmt: skip
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)  # first step of task 2: warm-up again
    assert lr_multiplier(170, cfg) == pytest.approx(0.5)  # 60 steps into task 2
    assert lr_multiplier(219, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_multiplier(5, LRScheduleConfig()) == 1.0
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([{"params": [p]}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5}], lr=2e-3)
    sched = LRSchedule(cfg)
    sched.init(nn.Module(), opt)
    sched.set_lr(opt, 170)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 0.25])


def test_task_length_fills_in_from_the_task():
    cfg = NetworkConfig(lr_schedule={"kind": "warmup_cosine", "warmup_steps": 2, "restart_at_task_boundary": True})
    chain = network_updates(cfg, task_length=20)
    net = build_mlp(2, 1, NetworkConfig(hidden=[2]), seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    chain.init(net, opt)
    chain.before_step(net, opt, 20)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


# --- RLlib: PPO and DQN with the network block ---------------------------------------------------------


def _check_learner(algo, train_iterations: int):
    from algorithms.networks.builders import Network
    from algorithms.networks.rllib import NetworkLearnerMixin

    learner = algo.learner_group._learner
    assert isinstance(learner, NetworkLearnerMixin)
    module = learner.module["default_policy"].unwrapped()
    networks = [m for m in module.modules() if isinstance(m, Network)]
    assert networks and all(any(isinstance(x, nn.LayerNorm) for x in n.modules()) for n in networks)
    nap = learner.network_updates_for("default_policy").find(NaP)
    before = {k: [p.detach().clone() for p in ps] for k, ps in nap_groups(module).items()}
    assert set(before) == set(nap.init_norms)
    for name, ps in before.items():
        assert float(group_norm(ps)) == pytest.approx(nap.init_norms[name], rel=1e-6)
    for _ in range(train_iterations):
        result = algo.train()
    moved = 0.0
    for name, ps in nap_groups(module).items():
        assert float(group_norm(ps)) == pytest.approx(nap.init_norms[name], rel=1e-5), name
        moved += float(sum((a.detach() - b).norm() for a, b in zip(ps, before[name])))
    assert moved > 0  # weights were trained, then projected
    assert result["learners"]["default_policy"]["network_nap_max_norm_deviation"] < 1e-5
    return module


def test_rllib_ppo_with_network_block(ray_local):
    from ray.rllib.algorithms.ppo import PPOConfig

    from algorithms.networks.block import apply_network_block
    from algorithms.networks.rllib import NetworkPPOTorchRLModule

    cfg = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0)
        .training(train_batch_size_per_learner=128, minibatch_size=64, num_epochs=2)
    )
    schedule = {"kind": "warmup_cosine", "warmup_steps": 1000, "total_steps": 5000}
    block = NetworkConfig(hidden=[32, 32], norm="layer", nap=True, lr_schedule=schedule)
    apply_network_block(cfg, block)
    algo = cfg.build_algo()
    try:
        module = _check_learner(algo, train_iterations=2)
        assert isinstance(module, NetworkPPOTorchRLModule)
        assert module.encoder.critic_encoder is not None  # vf_share_layers=False: separate torsos
        env_module = algo.env_runner.module
        assert isinstance(env_module, NetworkPPOTorchRLModule)
        # The schedule runs on env steps sampled: the 2nd update (after 256 steps) used lr·m(256).
        learner = algo.learner_group._learner
        (_, opt), = learner.get_optimizers_for_module("default_policy")
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_multiplier(256, block.lr_schedule))
        assert lr_multiplier(256, block.lr_schedule) == pytest.approx(257 / 1000)
        # The pieces' state travels with the learner state (restores keep the ORIGINAL initial norms).
        from algorithms.networks.rllib import NETWORK_UPDATES_STATE

        state = learner.get_state()
        saved = state[NETWORK_UPDATES_STATE]["default_policy"]
        nap = learner.network_updates_for("default_policy").find(NaP)
        assert saved["chain"]["pieces"][-1]["init_norms"] == nap.init_norms and saved["steps"] > 0
        changed = {k: 2 * v for k, v in nap.init_norms.items()}
        saved["chain"]["pieces"][-1]["init_norms"] = changed
        learner.set_state({NETWORK_UPDATES_STATE: state[NETWORK_UPDATES_STATE]})
        assert nap.init_norms == changed
    finally:
        algo.stop()


def test_rllib_dqn_with_network_block(ray_local):
    from ray.rllib.algorithms.dqn import DQNConfig

    from algorithms.networks.block import apply_network_block
    from algorithms.networks.rllib import NetworkDQNTorchRLModule

    cfg = (
        DQNConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, rollout_fragment_length=16)
        .training(num_steps_sampled_before_learning_starts=32, train_batch_size_per_learner=32)
        .reporting(min_sample_timesteps_per_iteration=64)
    )
    apply_network_block(cfg, NetworkConfig(hidden=[32], norm="layer", nap=True))
    algo = cfg.build_algo()
    try:
        module = _check_learner(algo, train_iterations=1)
        assert isinstance(module, NetworkDQNTorchRLModule)
        assert not any(p.requires_grad for p in module._target_encoder.parameters())
    finally:
        algo.stop()


def test_network_block_rejects_unsupported_algorithms():
    from ray.rllib.algorithms.sac import SACConfig

    from algorithms.networks.block import apply_network_block

    with pytest.raises(ValueError, match="SAC.*not supported"):
        apply_network_block(SACConfig(), NetworkConfig())


def test_rllib_modules_for_minatar_images_inference_only_and_dueling():
    import gymnasium as gym
    import numpy as np
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from algorithms.networks.builders import CNN
    from algorithms.networks.rllib import NetworkDQNTorchRLModule, NetworkPPOTorchRLModule

    obs = gym.spaces.Box(0, 1, (10, 10, 4), np.float32)  # MinAtar, channels-last
    act = gym.spaces.Discrete(6)
    mc = {"network": {"hidden": [32], "norm": "layer", "nap": True}, "vf_share_layers": False}
    x = torch.rand(3, 10, 10, 4)
    learner_side = RLModuleSpec(NetworkPPOTorchRLModule, obs, act, model_config=mc).build()
    assert isinstance(learner_side.encoder.actor_encoder, CNN)
    assert learner_side.forward_train({"obs": x})["action_dist_inputs"].shape == (3, 6)
    assert learner_side.compute_values({"obs": x}).shape == (3,)
    runner_side = RLModuleSpec(NetworkPPOTorchRLModule, obs, act, model_config=mc, inference_only=True).build()
    assert runner_side.encoder.critic_encoder is None and not hasattr(runner_side, "vf")
    runner_side.set_state(learner_side.get_state(inference_only=True))
    assert torch.equal(
        runner_side.forward_inference({"obs": x})["action_dist_inputs"],
        learner_side.forward_inference({"obs": x})["action_dist_inputs"],
    )
    dqn_mc = {"network": {"hidden": [32], "norm": "rms"}, "dueling": True, "double_q": True, "num_atoms": 1,
              "epsilon": [(0, 1.0), (1000, 0.05)]}  # fmt: skip
    dqn = RLModuleSpec(NetworkDQNTorchRLModule, obs, act, model_config=dqn_mc).build()
    dqn.make_target_networks()
    assert dqn.compute_q_values({"obs": x})["qf_preds"].shape == (3, 6)
    assert set(nap_groups(dqn)) == {"encoder.torso.convs.0.layer.weight", "encoder.torso.blocks.0.layer.weight",
                                    "encoder.torso.convs.0.norm", "encoder.torso.blocks.0.norm"}  # fmt: skip
