"""The Nature-DQN encoder (`network: {encoder: nature_cnn}`, Mnih et al. 2015) on ALE's [4, 84, 84] stacks:
shapes and parameter count by hand, the 1/255 input scaling, the norm / NaP / weight-decay variants, the
spec's one-line error, and training with RLlib's PPO and DQN and with the off-policy core's Q-learner."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from torch import nn

import algorithms.envs  # noqa: F401  (registers ale/<Game>)
from algorithms.networks import (
    NatureCNN,
    NetworkConfig,
    build_network,
    group_norm,
    nap_groups,
    network_updates,
)

ALE_SHAPE = (4, 84, 84)

# Hand count for [4, 84, 84]: conv maps 84 -> (84-8)//4+1 = 20 -> (20-4)//2+1 = 9 -> (9-3)//1+1 = 7.
CONV1 = 4 * 8 * 8 * 32 + 32  # 8,224
CONV2 = 32 * 4 * 4 * 64 + 64  # 32,832
CONV3 = 64 * 3 * 3 * 64 + 64  # 36,928
DENSE = 64 * 7 * 7 * 512 + 512  # 3136 features -> 512: 1,606,144
HEAD_18 = 512 * 18 + 18  # 9,234


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shapes_and_parameter_count_match_the_hand_count():
    net = build_network(ALE_SHAPE, 18, NetworkConfig(encoder="nature_cnn"), seed=0)
    assert isinstance(net, NatureCNN)
    assert [(c.layer.out_channels, c.layer.kernel_size, c.layer.stride) for c in net.convs] == [
        (32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)), (64, (3, 3), (1, 1))]
    assert [type(c.act) for c in net.convs] == [nn.ReLU] * 3 and [b.layer.out_features for b in net.blocks] == [512]
    assert _count(net) == CONV1 + CONV2 + CONV3 + DENSE + HEAD_18 == 1_693_362
    torso = build_network(ALE_SHAPE, None, NetworkConfig(encoder="nature_cnn"), seed=0)
    assert _count(torso) == 1_684_128 and torso.out_features == 512

    maps = []
    hooks = [c.act.register_forward_hook(lambda m, i, o: maps.append(tuple(o.shape))) for c in net.convs]
    x = torch.randint(0, 256, (5, *ALE_SHAPE), dtype=torch.uint8)
    out = net(x)
    for h in hooks:
        h.remove()
    assert maps == [(5, 32, 20, 20), (5, 64, 9, 9), (5, 64, 7, 7)] and out.shape == (5, 18)


def test_input_is_scaled_by_one_over_255_for_uint8_and_float_pixels():
    net = build_network(ALE_SHAPE, 6, NetworkConfig(encoder="nature_cnn"), seed=1)
    x = torch.randint(0, 256, (3, *ALE_SHAPE), dtype=torch.uint8)
    with torch.no_grad():
        by_hand = x.float() / 255.0
        for block in net.convs:
            by_hand = block(by_hand)
        by_hand = net.output(net.blocks[0](by_hand.flatten(1)))
        torch.testing.assert_close(net(x), by_hand)
        torch.testing.assert_close(net(x.float()), by_hand)  # float pixels in [0, 255] give the same values


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_normalised_variant_with_nap_and_weight_decay(norm: str):
    cfg = NetworkConfig(encoder="nature_cnn", norm=norm, nap=True, weight_decay={"kind": "l2", "coef": 0.1})
    net = build_network(ALE_SHAPE, 18, cfg, seed=0)
    # With a norm the conv/dense layers drop their bias; the norm over [C, H, W] (or [512]) sits before the ReLU.
    assert all(layer.bias is None for layer in net.hidden_layers())
    assert [tuple(n.weight.shape) for n in net.norm_layers()] == [(32, 20, 20), (64, 9, 9), (64, 7, 7), (512,)]
    assert net.normalised_layers() == ["convs.0.layer", "convs.1.layer", "convs.2.layer", "blocks.0.layer"]
    assert _count(net) == (CONV1 - 32) + (CONV2 - 64) + (CONV3 - 64) + (DENSE - 512) + HEAD_18 + 2 * (
        32 * 20 * 20 + 64 * 9 * 9 + 64 * 7 * 7 + 512)

    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    chain = network_updates(cfg)
    chain.init(net, [opt])
    init = {name: float(group_norm(ps)) for name, ps in nap_groups(net).items()}
    assert len(init) == 8 and "output" not in " ".join(init)  # 4 hidden weights, 4 norm (scale, offset) pairs
    x = torch.randint(0, 256, (8, *ALE_SHAPE), dtype=torch.uint8)
    for step in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        chain.after_step(net, [opt], step)
        # NaP: every hidden weight and norm group back at its initial norm after each step (Lyle et al.
        # 2024); the output layer is not projected. (Measured with group_norm, the norm NaP projects to: a
        # float32 torch.linalg norm of the 1.6M-entry dense weight differs from it by up to ~4e-5.)
        for name, ps in nap_groups(net).items():
            assert float(group_norm(ps)) == pytest.approx(init[name], rel=1e-5), (name, step)
    assert net(x).shape == (8, 18) and torch.isfinite(net(x)).all()


def test_encoder_choice_is_validated():
    with pytest.raises(ValueError, match="'auto' or 'nature_cnn'"):
        NetworkConfig(encoder="nature")
    with pytest.raises(ValueError, match="encoder nature_cnn has fixed conv layers"):
        NetworkConfig(encoder="nature_cnn", cnn={"channels": [16]})
    with pytest.raises(ValueError, match=r"images \[C, H, W\]"):
        build_network((128,), 4, NetworkConfig(encoder="nature_cnn"))
    with pytest.raises(ValueError, match="too large for input"):
        build_network((4, 32, 32), 4, NetworkConfig(encoder="nature_cnn"))
    assert NetworkConfig(encoder="nature_cnn").hidden == [512]
    assert NetworkConfig(encoder="nature_cnn", hidden=[256, 256]).hidden == [256, 256]


def test_spec_names_file_key_and_allowed_encoders(tmp_path):
    from orchestration.spec import SpecError, load_spec

    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nalgorithm: PPO\nenv: ale/Pong\nconfig:\n  network: {encoder: nature}\n")
    with pytest.raises(SpecError) as err:
        load_spec(str(path))
    message = str(err.value)
    assert "\n" not in message and "bad.yaml" in message and "config.network.encoder" in message, message
    assert "'auto'" in message and "'nature_cnn'" in message, message


def _ppo_config():
    from ray.rllib.algorithms.ppo import PPOConfig

    from algorithms.networks.block import apply_network_block

    cfg = (PPOConfig().environment("ale/Pong", env_config={"max_num_frames_per_episode": 400})
           .env_runners(num_env_runners=0, rollout_fragment_length=64)
           .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1).debugging(seed=0))
    apply_network_block(cfg, NetworkConfig(encoder="nature_cnn", norm="layer", nap=True))
    return cfg


@pytest.mark.slow  # about 40 s on 2 loaded cores: RLlib builds the algorithm, its learner and env runner
def test_rllib_ppo_trains_one_iteration_on_ale_with_the_nature_cnn(ray_local):
    torch.set_num_threads(1)
    algo = _ppo_config().build_algo()
    try:
        module = algo.get_module()
        assert isinstance(module.encoder.actor_encoder, NatureCNN)
        before = [p.detach().clone() for p in module.encoder.actor_encoder.parameters()]
        result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 64
        learner = result["learners"]["default_policy"]
        assert np.isfinite(learner["policy_loss"]) and learner["network_nap_max_norm_deviation"] < 1e-5
        after = list(algo.get_module().encoder.actor_encoder.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the update reached the CNN
    finally:
        algo.stop()


def test_rllib_dqn_module_and_core_q_learner_build_on_the_nature_cnn():
    """RLlib DQN's module and the off-policy core's Q-learner (EVE's epsilon-greedy baseline) with the
    Nature CNN; the core runs a few real updates from a uint8 replay on ale/Breakout."""
    from ray.rllib.algorithms.dqn import DQNConfig

    from algorithms.eve.config import EVEConfig
    from algorithms.networks.block import apply_network_block
    from algorithms.offpolicy.inprocess import build_runner_and_learner, core_step

    torch.set_num_threads(1)
    env = gymnasium.make("ale/Breakout")
    dqn = DQNConfig().environment("ale/Breakout")
    apply_network_block(dqn, NetworkConfig(encoder="nature_cnn"))
    module = dqn.get_rl_module_spec(env=env).build()
    assert isinstance(module.encoder.torso, NatureCNN) and module.af.out_features == 18
    obs, _ = env.reset(seed=0)
    assert module.compute_q_values({"obs": torch.as_tensor(obs[None])})["qf_preds"].shape == (1, 18)

    cfg = (EVEConfig().environment("ale/Breakout", env_config={"max_num_frames_per_episode": 400})
           .debugging(seed=0).training(exploration="epsilon_greedy", q_heads="shared", learning_starts=32,
                                       train_batch_size_per_learner=8, samples_per_insert=2.0,
                                       replay_capacity=256))
    cfg.network = NetworkConfig(encoder="nature_cnn")
    runner, learner = build_runner_and_learner(cfg)
    assert isinstance(runner.module.q, NatureCNN) and learner.replay.obs_dtype == torch.uint8
    before = [p.detach().clone() for p in learner.module["default_policy"].q.parameters()]
    for _ in range(12):
        core_step(runner, learner, cfg, 4)
    assert learner.replay.num_env_steps == 48 and learner.num_updates == (48 - 32) * 2 // 8
    after = list(learner.module["default_policy"].q.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
