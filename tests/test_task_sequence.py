"""Task-sequence env: schedule on the global step, switch at episode boundaries, padded spaces, action
mapping, seeding, restorable count, and a real RLlib PPO iteration on a MinAtar sequence."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

import algorithms.envs  # noqa: F401
from algorithms.envs.sequence import (
    TaskSequenceEnv,
    set_task_sequence_step,
    task_index,
    task_sequence_envs,
)

# deep_sea episodes last exactly N steps, so the switch points are known in advance.
DEEP_SEA_10, DEEP_SEA_12 = "bsuite/deep_sea-0", "bsuite/deep_sea-1"


def test_task_index_closed_form():
    assert [task_index(s, 25, 3) for s in (0, 24, 25, 49, 50, 74, 75, 100)] == [0, 0, 1, 1, 2, 2, 0, 1]


def test_switch_at_first_episode_boundary_after_the_boundary_step():
    env = gymnasium.make("sequence/tasks", tasks=[DEEP_SEA_10, DEEP_SEA_12], switch_every=25)
    _, info = env.reset(seed=0)
    resets = [(info["global_step"], info["task_id"], info["task_switched"])]
    ends = []
    while len(resets) < 8:
        _, _, terminated, truncated, info = env.step(0)
        if terminated or truncated:
            ends.append((info["task_id"], info["task_episode_length"]))
            _, info = env.reset()
            resets.append((info["global_step"], info["task_id"], info["task_switched"]))
    # Size-10 episodes to step 30 (first boundary at 25), size-12 episodes to 54 (boundary 50), ...
    assert resets == [(0, 0, False), (10, 0, False), (20, 0, False), (30, 1, True), (42, 1, False),
                      (54, 0, True), (64, 0, False), (74, 0, False)]
    assert ends[:5] == [(0, 10), (0, 10), (0, 10), (1, 12), (1, 12)]


def test_padded_observation_space_and_zero_padding():
    env = gymnasium.make("sequence/minatar", games=["breakout", "seaquest"], switch_every=100)
    assert env.observation_space == gymnasium.spaces.Box(0.0, 1.0, (10, 10, 10), np.float32)
    assert env.action_space == gymnasium.spaces.Discrete(6)
    obs, info = env.reset(seed=0)
    assert info["task_id"] == 0 and obs.dtype == np.float32
    assert obs[..., :4].sum() > 0 and not obs[..., 4:].any()  # breakout has 4 channels
    env.unwrapped.set_global_step(100)
    obs, info = env.reset()
    assert info["task_id"] == 1 and info["task_switched"] and env.observation_space.contains(obs)
    seq = gymnasium.make("sequence/tasks", tasks=[DEEP_SEA_10, DEEP_SEA_12], switch_every=5)
    assert seq.observation_space.shape == (144,)
    obs, _ = seq.reset(seed=0)
    assert obs[0] == 1.0 and obs.sum() == 1.0 and not obs[100:].any()


def test_invalid_actions_become_no_op():
    # Minimal action sets: breakout has 3 actions, seaquest 6 -> Discrete(6); on breakout 3..5 -> 0.
    def trace(action):
        env = gymnasium.make("sequence/minatar", games=["breakout", "seaquest"], switch_every=10**6,
                             minimal_action_set=True, sticky_action_prob=0.0)
        obs, _ = env.reset(seed=1)
        out = [obs]
        for _ in range(30):
            obs, *_ = env.step(action)
            out.append(obs)
        return np.stack(out)

    assert gymnasium.make("sequence/minatar", games=["breakout", "seaquest"], switch_every=5,
                          minimal_action_set=True).action_space == gymnasium.spaces.Discrete(6)
    np.testing.assert_array_equal(trace(5), trace(0))
    assert not np.array_equal(trace(1), trace(0))  # 'left' moves the paddle


def test_same_seed_same_trajectory_across_switches():
    def trace(seed):
        env = gymnasium.make("sequence/minatar", games=["breakout", "asterix"], switch_every=40)
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(300):
            obs, r, terminated, truncated, info = env.step(int(rng.integers(6)))
            out.append(np.append(obs.ravel(), [r, info["task_id"]]))
            if terminated or truncated:
                obs, info = env.reset()
        return np.concatenate(out)

    a, b = trace(5), trace(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, trace(6))


def test_start_step_state_and_restore_take_effect_at_next_episode():
    env = TaskSequenceEnv([DEEP_SEA_10, DEEP_SEA_12], switch_every=25, start_step=25)
    _, info = env.reset(seed=0)
    assert info["task_id"] == 1 and env.get_state() == {"global_step": 25, "current_task": 1}
    for _ in range(3):
        env.step(0)
    env.set_state({"global_step": 50})  # mid-episode: the episode stays on task 1
    _, _, _, _, info = env.step(0)
    assert info["task_id"] == 1 and info["global_step"] == 51
    for _ in range(8):
        env.step(0)
    _, info = env.reset()
    assert info["task_id"] == 0 and info["task_switched"]
    with pytest.raises(ValueError, match="global_step"):
        env.set_state({"step": 3})


def test_step_scale_counts_global_steps_for_parallel_copies():
    env = TaskSequenceEnv([DEEP_SEA_10, DEEP_SEA_12], switch_every=40, step_scale=4)
    env.reset(seed=0)
    for _ in range(10):  # one deep_sea-10 episode = 40 global steps with 4 copies in lockstep
        *_, info = env.step(0)
    assert info["global_step"] == 40
    assert env.reset()[1]["task_id"] == 1


def test_one_env_id_with_per_task_kwargs():
    env = TaskSequenceEnv(env_id="minatar/breakout", task_kwargs=[{"sticky_action_prob": 0.0},
                                                                  {"sticky_action_prob": 1.0}], switch_every=3)
    assert env.task_names == ["minatar/breakout[0]", "minatar/breakout[1]"]
    assert env.observation_space.shape == (10, 10, 4)


def test_bad_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match="switch_every"):
        gymnasium.make("sequence/minatar", games=["breakout"])
    with pytest.raises(ValueError, match="games must be"):
        gymnasium.make("sequence/minatar", games=["pong"], switch_every=10)
    with pytest.raises(ValueError, match="keys"):
        TaskSequenceEnv([{"env": "minatar/breakout"}], switch_every=10)
    with pytest.raises(ValueError, match="action spaces"):
        TaskSequenceEnv(["dmc/cartpole-balance", "bsuite/deep_sea-0"], switch_every=10)  # Box vs Discrete
    with pytest.raises(ValueError, match="number of dimensions"):
        TaskSequenceEnv(["minatar/breakout", "bsuite/deep_sea-0"], switch_every=10)


def test_rllib_ppo_iteration_on_minatar_sequence(ray_local):
    import torch
    from ray.rllib.algorithms.ppo import PPOConfig

    torch.set_num_threads(1)
    config = (
        PPOConfig()
        .environment("sequence/minatar", env_config={"games": ["breakout", "space_invaders"], "switch_every": 150})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1, rollout_fragment_length=200)
        .training(train_batch_size_per_learner=400, minibatch_size=200, num_epochs=1)
        .debugging(seed=0)
    )
    algo = config.build_algo()
    try:
        result = algo.train()
        sampled = result["env_runners"]["num_env_steps_sampled_lifetime"]
        (env,) = task_sequence_envs(algo.env_runner.env)
        assert env.observation_space.shape == (10, 10, 6)
        assert env.global_step == sampled >= 400
        assert all(n > 0 for n in env.episodes_per_task)  # both games were played and finished episodes
        assert set_task_sequence_step(algo.env_runner.env, 10_000) == 1 and env.global_step == 10_000
    finally:
        algo.stop()
