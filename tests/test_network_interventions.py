"""Plasticity interventions of the network block: ReDo, Shrink & Perturb, resets, CReLU — each against a case
computed by hand or by construction, their state round trip, and runs through RLlib and the off-policy core."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from algorithms.diagnostics.plasticity import capture_activations, dormant_ratio
from algorithms.networks import (
    CReLU,
    NetworkConfig,
    build_cnn,
    build_mlp,
    fresh_parameters,
    network_layers,
    network_updates,
    redo_scores,
)
from algorithms.networks.interventions import ReDo, Reset, ShrinkPerturb, layers_to_reset, reset_layers_

torch.set_num_threads(1)  # tiny networks: extra threads only contend on the shared 2-core machine


def _adam_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()


def _fill_moments(opt: torch.optim.Adam) -> None:
    """Known moments: exp_avg = 1, exp_avg_sq = 2 everywhere (so resets to 0 are visible)."""
    for state in opt.state.values():
        state["exp_avg"].fill_(1.0)
        state["exp_avg_sq"].fill_(2.0)


# --- ReDo ---------------------------------------------------------------------------------------


def test_redo_scores_hand_computed():
    h = torch.tensor([[1.0, 0.0, 3.0], [-1.0, 0.0, 1.0]])  # E|h| = [1, 0, 2], layer mean 1
    assert torch.allclose(redo_scores(h), torch.tensor([1.0, 0.0, 2.0]))
    # CReLU: features [relu(x_0), relu(x_1), relu(-x_0), relu(-x_1)], E|h| = [1, 0, 0, 3]:
    # u = E|h_i| + E|h_{i+H}| = [1, 3], s = u / mean(u) = [0.5, 1.5]
    hc = torch.tensor([[2.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 3.0]])
    assert torch.allclose(redo_scores(hc, 2), torch.tensor([0.5, 1.5]))
    # conv maps [N, C, H, W]: a unit is a channel, E over inputs and positions
    hm = torch.zeros(2, 2, 2, 2)
    hm[:, 1] = 4.0
    assert torch.allclose(redo_scores(hm), torch.tensor([0.0, 2.0]))
    assert torch.equal(redo_scores(torch.zeros(3, 4)), torch.zeros(4))  # all dead: every unit dormant


def _net_with_dead_units() -> nn.Module:
    """MLP 3 -> [4, 4] -> 2 (ReLU, no norm): units 1, 3 of block 0 and unit 0 of block 1 are dead (zero
    incoming weights, bias −1: relu(−1) = 0 for every input); the other units have bias +5 (alive)."""
    net = build_mlp(3, 2, NetworkConfig(hidden=[4, 4]), seed=0)
    with torch.no_grad():
        b0, b1 = net.blocks[0].layer, net.blocks[1].layer
        b0.bias.fill_(5.0)
        b0.weight[[1, 3]] = 0.0
        b0.bias[[1, 3]] = -1.0
        b1.bias.fill_(5.0)
        b1.weight[0] = 0.0
        b1.bias[0] = -1.0
    return net


def test_redo_recycles_exactly_the_dormant_units_and_their_moments():
    net = _net_with_dead_units()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    redo = ReDo(every=1, tau=0.025, seed=3)
    redo.init(net, opt)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    _adam_step(net, opt, x)  # the hooks keep this forward's activations
    _fill_moments(opt)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(3)  # the piece's draws, in layer order: block 0, then block 1
    f0 = fresh_parameters(net.blocks[0].layer, g)
    f1 = fresh_parameters(net.blocks[1].layer, g)

    redo.after_step(net, opt, 0)

    after = net.state_dict()
    w0, c0, w1, c1, wo = (after[k] for k in ("blocks.0.layer.weight", "blocks.0.layer.bias",
                                             "blocks.1.layer.weight", "blocks.1.layer.bias", "output.weight"))
    # incoming weights and bias of the dead units: the fresh draw; the live units bit-identical
    assert torch.equal(w0[[1, 3]], f0["weight"][[1, 3]]) and torch.equal(c0[[1, 3]], f0["bias"][[1, 3]])
    assert torch.equal(w0[[0, 2]], before["blocks.0.layer.weight"][[0, 2]])
    assert torch.equal(c0[[0, 2]], before["blocks.0.layer.bias"][[0, 2]])
    assert torch.equal(w1[0], f1["weight"][0]) and torch.equal(c1[0], f1["bias"][0])
    assert torch.equal(c1[1:], before["blocks.1.layer.bias"][1:])
    # outgoing weights zeroed: block-1 columns 1, 3 (live rows 1..3), output column 0
    assert torch.equal(w1[1:][:, [1, 3]], torch.zeros(3, 2))
    assert torch.equal(w1[1:][:, [0, 2]], before["blocks.1.layer.weight"][1:][:, [0, 2]])
    assert torch.equal(wo[:, 0], torch.zeros(2)) and torch.equal(wo[:, 1:], before["output.weight"][:, 1:])
    assert torch.equal(after["output.bias"], before["output.bias"])
    # Adam moments: zero on exactly those rows/columns, untouched elsewhere
    for key, value in (("exp_avg", 1.0), ("exp_avg_sq", 2.0)):
        m = {name: opt.state[p][key] for name, p in net.named_parameters()}
        expect = {name: torch.full_like(t, value) for name, t in m.items()}
        expect["blocks.0.layer.weight"][[1, 3]] = 0
        expect["blocks.0.layer.bias"][[1, 3]] = 0
        expect["blocks.1.layer.weight"][0] = 0
        expect["blocks.1.layer.weight"][:, [1, 3]] = 0
        expect["blocks.1.layer.bias"][0] = 0
        expect["output.weight"][:, 0] = 0
        for name in m:
            assert torch.equal(m[name], expect[name]), (key, name)
    assert redo.units_reset == 3 and redo.firings == 1 and redo.last_dormant_fraction == pytest.approx(3 / 8)
    # the recycled units are alive again: a fresh forward has no dead unit in block 0
    acts = capture_activations(net, lambda: net(x))
    assert dormant_ratio(acts["blocks.0.act"], tau=0.0) == 0.0


def test_redo_fires_on_multiples_of_every_with_hooks_only_before_those_steps():
    net = _net_with_dead_units()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    redo = ReDo(every=3, tau=0.025)
    redo.init(net, opt)
    x = torch.randn(16, 3)
    armed = []
    for step in range(6):
        armed.append(bool(redo._handles))
        _adam_step(net, opt, x)
        redo.after_step(net, opt, step)
        if step in (2, 5):
            assert redo.firings == (1 if step == 2 else 2)
    assert armed == [False, False, True, False, False, True]  # hooks only on the forward of firing steps
    assert redo.units_reset >= 3  # the three dead units at the first firing


def test_redo_with_crelu_conv_channels_and_flattened_outgoing_columns():
    # obs 5x5x2, one 3x3 conv with 3 channels -> [3, 3, 3], CReLU -> 6 channels, output Linear(6*9, 2)
    cfg = NetworkConfig(hidden=[], activation="crelu", cnn={"channels": [3]})
    net = build_cnn((5, 5, 2), 2, cfg, seed=0)
    assert net.output.in_features == 6 * 9
    with torch.no_grad():
        conv = net.convs[0].layer
        conv.weight[1] = 0.0  # channel 1: pre-activation 0 everywhere -> relu(x) = relu(-x) = 0
        conv.bias[1] = 0.0
        conv.weight[2] = 0.0  # channel 2: pre-activation -5 -> relu(-x) = 5: alive under CReLU
        conv.bias[2] = -5.0
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    redo = ReDo(every=1, tau=0.0, seed=1)
    redo.init(net, opt)
    _adam_step(net, opt, torch.rand(8, 5, 5, 2))
    _fill_moments(opt)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fresh = fresh_parameters(conv, torch.Generator().manual_seed(1))
    redo.after_step(net, opt, 0)
    assert redo.units_reset == 1
    assert torch.equal(conv.weight[1], fresh["weight"][1]) and torch.equal(conv.bias[1], fresh["bias"][1])
    assert torch.equal(conv.weight[[0, 2]], before["convs.0.layer.weight"][[0, 2]])
    w = net.output.weight.view(2, 6, 9)  # [O, channels, positions]: channel 1 feeds features 1 and 1 + 3
    assert torch.equal(w[:, [1, 4]], torch.zeros(2, 2, 9))
    keep = [0, 2, 3, 5]
    assert torch.equal(w[:, keep], before["output.weight"].view(2, 6, 9)[:, keep])
    m = opt.state[net.output.weight]["exp_avg"].view(2, 6, 9)
    assert torch.equal(m[:, [1, 4]], torch.zeros(2, 2, 9)) and bool((m[:, keep] == 1).all())


# --- Shrink & Perturb ---------------------------------------------------------------------------


def test_fresh_parameters_are_the_layers_initialiser_under_the_drawn_seed():
    g = torch.Generator().manual_seed(5)
    layer = nn.Linear(4, 3)
    rng_before = torch.get_rng_state()
    fresh = fresh_parameters(layer, g)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is untouched
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(seed)
    ref = nn.Linear(4, 3)  # nn.Linear's own initialiser (kaiming-uniform weight, uniform bias)
    assert torch.equal(fresh["weight"], ref.weight) and torch.equal(fresh["bias"], ref.bias)


def test_shrink_perturb_is_lambda_theta_plus_sigma_fresh_draw():
    net = build_mlp(4, 2, NetworkConfig(hidden=[8, 8], norm="layer"), seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        _adam_step(net, opt, torch.randn(16, 4))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    moments = {k: opt.state[p]["exp_avg"].clone() for k, p in net.named_parameters()}
    lam, sigma = 0.7, 0.3
    sp = ShrinkPerturb(every=2, shrink=lam, perturb=sigma, seed=11)
    sp.init(net, opt)
    sp.after_step(net, opt, 0)  # step 0 of every=2: nothing
    assert all(torch.equal(p, before[k]) for k, p in net.named_parameters())
    g = torch.Generator().manual_seed(11)
    expected = {}
    for chain in network_layers(net):
        for layer in chain:
            for m in layer.modules:
                prefix = next(n for n, mod in net.named_modules() if mod is m)
                for name, f in fresh_parameters(m, g).items():
                    expected[f"{prefix}.{name}"] = lam * before[f"{prefix}.{name}"] + sigma * f
    sp.after_step(net, opt, 1)
    assert set(expected) == set(before)  # every parameter of the network
    for k, p in net.named_parameters():
        assert torch.equal(p, expected[k]), k
    # LayerNorm's initialiser is γ = 1, β = 0, so by hand: γ ← λγ + σ, β ← λβ
    g0, b0 = net.blocks[0].norm.weight, net.blocks[0].norm.bias
    assert torch.allclose(g0, lam * before["blocks.0.norm.weight"] + sigma, atol=1e-7)
    assert torch.allclose(b0, lam * before["blocks.0.norm.bias"], atol=1e-7)
    assert all(torch.equal(opt.state[p]["exp_avg"], moments[k]) for k, p in net.named_parameters())
    assert sp.applications == 1


# --- Resets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, k, reset_names", [
    ("last_k", 1, {"output"}),
    ("last_k", 2, {"output", "blocks.1.layer", "blocks.1.norm"}),
    ("all", None, {"output", "blocks.1.layer", "blocks.1.norm", "blocks.0.layer", "blocks.0.norm"}),
])  # fmt: skip
def test_resets_reinitialise_exactly_the_chosen_layers_and_clear_their_optimiser_state(layers, k, reset_names):
    net = build_mlp(4, 2, NetworkConfig(hidden=[8, 8], norm="layer"), seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        _adam_step(net, opt, torch.randn(16, 4))
    before = {k_: v.detach().clone() for k_, v in net.named_parameters()}
    reset = Reset(every=2, layers=layers, k=k, seed=2)
    reset.init(net, opt)
    g = torch.Generator().manual_seed(2)
    chosen = layers_to_reset(net, layers, k)
    expected = {}
    for layer in chosen:
        for m in layer.modules:
            prefix = next(n for n, mod in net.named_modules() if mod is m)
            expected.update({f"{prefix}.{n}": f for n, f in fresh_parameters(m, g).items()})
    reset.after_step(net, opt, 0)
    assert reset.resets == 0
    reset.after_step(net, opt, 1)
    assert reset.resets == 1
    assert {n.rsplit(".", 1)[0] for n in expected} == reset_names
    for name, p in net.named_parameters():
        if name in expected:
            assert torch.equal(p, expected[name])
            assert p not in opt.state  # cleared: Adam restarts it at zero moments and step 0
        else:
            assert torch.equal(p, before[name]) and p in opt.state
    _adam_step(net, opt, torch.randn(16, 4))  # the optimiser carries on
    assert all(float(opt.state[p]["step"]) == (1 if n in expected else 4) for n, p in net.named_parameters())


def test_reset_sets_rllib_dqn_target_copies_to_the_fresh_weights():
    import gymnasium as gym
    import numpy as np
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from algorithms.networks.rllib import NetworkDQNTorchRLModule

    obs, act = gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(2)
    mc = {"network": {"hidden": [8], "norm": "layer"}, "dueling": False, "double_q": True, "num_atoms": 1,
          "epsilon": [(0, 1.0), (1000, 0.05)]}  # fmt: skip
    module = RLModuleSpec(NetworkDQNTorchRLModule, obs, act, model_config=mc).build()
    module.make_target_networks()
    with torch.no_grad():  # targets lag behind: online != target before the reset
        for p in list(module.encoder.parameters()) + list(module.af.parameters()):
            p.add_(1.0)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad])
    chains = network_layers(module)
    assert [[layer.name for layer in c] for c in chains] == [["encoder.torso.blocks.0", "encoder.torso.heads"]]
    reset_layers_(module, layers_to_reset(module, "last_k", 1), opt, torch.Generator().manual_seed(0))
    assert torch.equal(module._target_af.weight, module.af.weight)  # head reset: target follows
    assert not torch.equal(module._target_encoder.torso.blocks[0].layer.weight,
                           module.encoder.torso.blocks[0].layer.weight)  # torso untouched, target still lags
    reset_layers_(module, layers_to_reset(module, "all", None), opt, torch.Generator().manual_seed(1))
    for online, target in module.get_target_network_pairs():
        assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))


def test_grouped_networks_take_resets_and_shrink_perturb():
    from algorithms.networks import build_grouped_mlp

    net = build_grouped_mlp(3, 4, 1, NetworkConfig(hidden=[8], norm="layer"), seed=0)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters())
    reset_layers_(net, layers_to_reset(net, "all", None), opt, torch.Generator().manual_seed(0))
    w = net.blocks[0].layer.weight
    assert not torch.equal(w, before[0]) and float(w.abs().max()) <= 1 / 3**0.5  # U(±1/sqrt(I)) per tower
    assert torch.equal(net.blocks[0].norm.weight, torch.ones(4, 8))
    ShrinkPerturb(every=1, shrink=0.5, perturb=0.0).after_step(net, opt, 0)
    assert torch.equal(net.blocks[0].norm.weight, torch.full((4, 8), 0.5))


# --- CReLU --------------------------------------------------------------------------------------


def test_crelu_closed_form_widths_and_hooks():
    x = torch.tensor([[1.5, -2.0, 0.0]])
    assert torch.equal(CReLU()(x), torch.tensor([[1.5, 0.0, 0.0, 0.0, 2.0, 0.0]]))
    net = build_mlp(3, 2, NetworkConfig(hidden=[4, 5], activation="crelu"), seed=0)
    assert [b.layer.in_features for b in net.blocks] == [3, 8] and net.output.in_features == 10
    torso = build_mlp(3, None, NetworkConfig(hidden=[4, 5], activation="crelu"))
    assert torso.out_features == 10 and torso(torch.randn(7, 3)).shape == (7, 10)
    # block 0 computes [relu(W x + b), relu(−(W x + b))]
    xs = torch.randn(7, 3)
    pre = net.blocks[0].layer(xs)
    assert torch.equal(net.blocks[0](xs), torch.cat([pre.clamp_min(0), (-pre).clamp_min(0)], -1))
    cnn = build_cnn((6, 6, 2), 3, NetworkConfig(hidden=[4], activation="crelu", cnn={"channels": [3, 2]}), seed=0)
    assert [c.layer.in_channels for c in cnn.convs] == [2, 6]
    assert cnn.blocks[0].layer.in_features == 4 * 2 * 2 and cnn.output.in_features == 8
    assert cnn(torch.rand(5, 6, 6, 2)).shape == (5, 3)
    # diagnostics hooks see the CReLU features (2H per layer); the dormant ratio counts them
    acts = capture_activations(net, lambda: net(xs))
    assert list(acts) == ["blocks.0.act", "blocks.1.act"] and acts["blocks.1.act"].shape == (7, 10)
    assert 0.0 <= dormant_ratio(list(acts.values())) <= 1.0
    with pytest.raises(ValueError, match="crelu"):
        from algorithms.networks import build_grouped_mlp

        build_grouped_mlp(3, 2, 1, NetworkConfig(hidden=[4], activation="crelu"))


# --- Validation and state -----------------------------------------------------------------------


def test_bad_intervention_values_name_the_key():
    for bad, key in [({"redo": {"every": 0}}, "redo.every"), ({"redo": {"tau": -0.1}}, "redo.tau"),
                     ({"redo": {"taus": 0.1}}, "redo.taus"), ({"shrink_perturb": {"shrink": 1.5}}, "shrink_perturb.shrink"),
                     ({"shrink_perturb": {"perturb": -1}}, "shrink_perturb.perturb"), ({"reset": {}}, "reset.every"),
                     ({"reset": {"every": 10, "layers": "last_k"}}, "reset.k"),
                     ({"reset": {"every": 10, "layers": "first"}}, "reset.layers"),
                     ({"activation": "crelu2"}, "activation")]:  # fmt: skip
        with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
            NetworkConfig.model_validate(bad)
    with pytest.raises(ValueError, match="redo.*grouped"):
        from algorithms.networks import build_grouped_mlp

        g = build_grouped_mlp(3, 2, 1, NetworkConfig(hidden=[4]))
        network_updates(NetworkConfig(hidden=[4], redo={})).init(g, torch.optim.Adam(g.parameters()))


def _run(net, opt, chain, steps: range) -> None:
    for step in steps:
        chain.before_step(net, opt, step)
        _adam_step(net, opt, torch.randn(16, 4, generator=torch.Generator().manual_seed(step)))
        chain.after_step(net, opt, step)


def test_state_round_trip_continues_the_schedules_bit_identically():
    cfg = NetworkConfig(hidden=[8, 8], norm="layer", redo={"every": 3, "tau": 0.5},
                        shrink_perturb={"every": 4, "shrink": 0.9, "perturb": 0.1},
                        reset={"every": 5, "layers": "last_k", "k": 1}, weight_decay={"kind": "l2", "coef": 0.1})
    net = build_mlp(4, 2, cfg, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    chain = network_updates(cfg)
    chain.init(net, opt)
    _run(net, opt, chain, range(8))  # after step 7 ReDo is armed for step 8
    saved = copy.deepcopy({"net": net.state_dict(), "opt": opt.state_dict(), "chain": chain.state_dict()})
    _run(net, opt, chain, range(8, 15))
    m = chain.metrics()
    assert m["redo_firings"] == 5 and m["shrink_perturb_applications"] == 3 and m["resets"] == 3
    assert m["redo_units_reset"] > 0

    net2 = build_mlp(4, 2, cfg, seed=1)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    chain2 = network_updates(cfg)
    chain2.init(net2, opt2)
    net2.load_state_dict(saved["net"])
    opt2.load_state_dict(saved["opt"])
    chain2.load_state_dict(saved["chain"])
    _run(net2, opt2, chain2, range(8, 15))
    assert chain2.metrics() == m
    for (name, a), b in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(a, b), name


# --- End to end ---------------------------------------------------------------------------------


def test_rllib_dqn_and_ppo_with_interventions(ray_local):
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.ppo import PPOConfig

    from algorithms.networks.block import apply_network_block

    dqn = (
        DQNConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, rollout_fragment_length=16)
        .training(num_steps_sampled_before_learning_starts=32, train_batch_size_per_learner=32)
        .reporting(min_sample_timesteps_per_iteration=64)
    )
    apply_network_block(dqn, NetworkConfig(hidden=[32], norm="layer", redo={"every": 2, "tau": 1.0},
                                           reset={"every": 3, "layers": "last_k", "k": 1},
                                           weight_decay={"kind": "l2", "coef": 1e-3}))
    ppo = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0)
        .training(train_batch_size_per_learner=128, minibatch_size=64, num_epochs=2)
    )
    apply_network_block(ppo, NetworkConfig(hidden=[16, 16], activation="crelu", redo={"every": 2, "tau": 1.0},
                                           shrink_perturb={"every": 3, "shrink": 0.8, "perturb": 0.1}))
    for cfg, iterations in ((dqn, 2), (ppo, 2)):
        algo = cfg.build_algo()
        try:
            for _ in range(iterations):
                result = algo.train()
            stats = result["learners"]["default_policy"]
            assert stats["network_redo_firings"] >= 1 and stats["network_redo_units_reset"] > 0
            if cfg is dqn:
                assert stats["network_resets"] >= 1
                # the pieces' state (generators, counters) travels with the learner state
                from algorithms.networks.rllib import NETWORK_UPDATES_STATE

                learner = algo.learner_group._learner
                redo = learner.network_updates_for("default_policy").find(ReDo)
                saved = copy.deepcopy(learner.get_state()[NETWORK_UPDATES_STATE])
                units, gen = redo.units_reset, redo.generator.get_state()
                redo.units_reset = -1
                torch.randint(0, 10, (3,), generator=redo.generator)
                learner.set_state({NETWORK_UPDATES_STATE: saved})
                assert redo.units_reset == units and torch.equal(redo.generator.get_state(), gen)
            else:
                assert stats["network_shrink_perturb_applications"] >= 1
            assert result["env_runners"]["num_env_steps_sampled_lifetime"] > 0
        finally:
            algo.stop()


def test_off_policy_core_eve_with_redo_and_resets_without_ray():
    from algorithms.eve.config import EVEConfig
    from algorithms.networks.interventions import layers_to_reset
    from algorithms.offpolicy.inprocess import build_runner_and_learner, core_step
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    block = {"hidden": [16], "norm": "layer", "redo": {"every": 4, "tau": 1.0},
             "reset": {"every": 20, "layers": "all"}}  # fmt: skip
    cfg = (EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=0)
           .training(exploration="epsilon_greedy", q_heads="shared", network=block))
    runner, learner = build_runner_and_learner(cfg)
    for _ in range(50):
        core_step(runner, learner, cfg, 4)
    assert learner.num_updates >= 40
    chain = learner.network_updates_for("default_policy")
    m = chain.metrics()
    assert m["redo_firings"] == learner.num_updates // 4 and m["redo_units_reset"] > 0
    assert m["resets"] == learner.num_updates // 20
    stats = learner.reduce_stats()["default_policy"]
    assert stats["network_redo_units_reset"] == m["redo_units_reset"]
    # the core's target copy (target_q) takes the fresh weights of a reset
    module = learner.module["default_policy"].unwrapped()
    with torch.no_grad():
        for p in module.target_q.parameters():
            p.add_(1.0)
    reset_layers_(module, layers_to_reset(module, "all", None), learner._optimizers_of("default_policy"),
                  torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(module.q.parameters(), module.target_q.parameters()))
