"""ale/<Game> and sequence/ale on the real Arcade Learning Environment (ale-py's shipped ROMs).

Protocol under test (Machado et al. 2018; algorithms/envs/ale.py): sticky actions 0.25 in the emulator,
the full action set, 4 emulator frames per agent step with max-pooling of the last two, 84x84 greyscale,
4 stacked frames [C, H, W] uint8, episodes truncated at 108,000 frames, life loss off by default.
"""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

import algorithms.envs  # noqa: F401  (registers the ids)
from algorithms.envs.registration import ALE_GAMES, ale_env_id, all_ale_env_ids
from algorithms.envs.sequence import ALE_SEQUENCE_GAMES, TaskSequenceEnv

NO_SINGLE_PLAYER_MODE = {"combat", "joust", "maze_craze", "warlords"}
# ALE's legal action set of these two ROMs has no fire button: 9 actions even with the full action set.
NINE_ACTION_GAMES = {"lost_luggage", "skiing"}


def _wrapper(env: gymnasium.Env, cls: type) -> gymnasium.Wrapper:
    while not isinstance(env, cls):
        env = env.env
    return env


def test_every_single_player_game_of_ale_py_is_registered():
    from ale_py import roms
    from ale_py.registration import rom_id_to_name

    expected = [r for r in roms.get_all_rom_ids() if r not in NO_SINGLE_PLAYER_MODE]
    assert list(ALE_GAMES) == expected
    assert all_ale_env_ids() == [f"ale/{rom_id_to_name(r)}" for r in expected]
    assert len(all_ale_env_ids()) == 104
    assert {"ale/Pong", "ale/Breakout", "ale/SpaceInvaders", "ale/MontezumaRevenge"} <= set(all_ale_env_ids())
    for env_id, game in zip(all_ale_env_ids(), ALE_GAMES):
        spec = gymnasium.registry[env_id]
        assert spec.entry_point == "algorithms.envs.ale:make_ale_env" and spec.kwargs == {"game": game}


@pytest.mark.parametrize("env_id", ["ale/Pong", "ale/Breakout"])
def test_protocol_observation_actions_and_emulator_settings(env_id: str):
    env = gymnasium.make(env_id)
    assert env.observation_space == gymnasium.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert env.action_space == gymnasium.spaces.Discrete(18)  # the full action set
    ale = env.unwrapped.ale
    assert ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert ale.getInt("max_num_frames_per_episode") == 108_000
    assert ale.getInt("frame_skip") == 1  # skipping is done (and max-pooled) by AtariPreprocessing
    pre = _wrapper(env, AtariPreprocessing)
    assert (pre.frame_skip, pre.noop_max, pre.terminal_on_life_loss, pre.grayscale_obs) == (4, 0, False, True)
    assert pre.obs_buffer[0].shape == (210, 160) and len(pre.obs_buffer) == 2  # max over the last two frames
    assert _wrapper(env, FrameStackObservation).stack_size == 4

    obs, info = env.reset(seed=3)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and info["episode_frame_number"] == 0
    rng = np.random.default_rng(0)
    prev = obs
    for t in range(1, 11):
        obs, _, terminated, truncated, info = env.step(int(rng.integers(18)))
        assert not (terminated or truncated)
        assert ale.getEpisodeFrameNumber() == 4 * t == info["episode_frame_number"]
        assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
        np.testing.assert_array_equal(obs[:3], prev[1:])  # [C, H, W]: oldest frame first, newest last
        prev = obs
    assert obs.max() > obs.min()  # a real screen, not a blank
    env.close()


def test_seeded_episodes_replay_and_env_config_overrides_reach_the_emulator():
    def rollout(seed: int) -> np.ndarray:
        env = gymnasium.make("ale/Breakout", repeat_action_probability=0.5, max_num_frames_per_episode=40)
        assert env.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.5)
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        for t in range(1, 11):
            obs, _, terminated, truncated, _ = env.step(t % 4)
            frames.append(obs)
            # 40 frames = 10 agent steps: the cap ends the episode as a truncation, not a termination.
            assert (terminated, truncated) == (False, t == 10)
        env.close()
        return np.stack(frames)

    np.testing.assert_array_equal(rollout(7), rollout(7))


def test_life_loss_ends_the_episode_only_with_the_option():
    def first_episode(**kwargs) -> tuple[int, dict]:
        env = gymnasium.make("ale/Breakout", **kwargs)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        for t in range(1, 5000):
            _, _, terminated, truncated, info = env.step(int(rng.integers(18)))
            if terminated or truncated:
                env.close()
                return t, info
        raise AssertionError("no episode end within 5000 steps")

    steps_default, info_default = first_episode()
    steps_life, info_life = first_episode(terminal_on_life_loss=True)
    assert info_default["lives"] == 0  # game over: all 5 lives used
    assert info_life["lives"] == 4  # the first life lost ended the episode
    assert steps_life < steps_default


def test_sequence_ale_shares_spaces_and_switches_game_on_the_frame_budget():
    env = gymnasium.make("sequence/ale", games=["breakout", "pong"], frames_per_game=80,
                         max_num_frames_per_episode=60)
    seq = env.unwrapped
    assert isinstance(seq, TaskSequenceEnv) and seq.task_names == ["breakout", "pong"]
    assert seq.switch_every == 20  # 80 frames / 4 frames per agent step
    assert env.observation_space == gymnasium.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert env.action_space == gymnasium.spaces.Discrete(18)
    _, info = env.reset(seed=0)
    tasks, returns = [info["task_id"]], []
    for _ in range(60):
        _, _, terminated, truncated, info = env.step(1)
        if terminated or truncated:
            returns.append((info["task_id"], info["task_episode_length"]))
            _, info = env.reset()
            tasks.append(info["task_id"])
    # 15-step episodes (60 frames), 20-step game budget: resets at global steps 15, 30, 45 pick
    # floor(s / 20) mod 2 = 0, 1, 0 (a switch lands on the next episode boundary; the games cycle).
    assert returns[:3] == [(0, 15), (0, 15), (1, 15)] and tasks[:4] == [0, 0, 1, 0]
    env.close()


def test_sequence_ale_rejects_unknown_games_and_budgets():
    with pytest.raises(ValueError, match="single-player ale_py ROM ids"):
        gymnasium.make("sequence/ale", games=["pong", "not_a_game"], frames_per_game=400)
    with pytest.raises(ValueError, match="multiple of frame_skip"):
        gymnasium.make("sequence/ale", games=["pong"], frames_per_game=401)
    assert all(g in ALE_GAMES and g not in NINE_ACTION_GAMES for g in ALE_SEQUENCE_GAMES)
    assert len(ALE_SEQUENCE_GAMES) == 10


def test_the_sequence_games_and_the_nine_action_games_build_with_the_protocol_spaces():
    """The ROMs load from the wheel with the protocol's spaces: the ten `sequence/ale` games (18 actions) and the
    two whose legal set has no fire button (9). A loop over all 104 games passed the same checks (102 with 18
    actions) but takes 2.5 minutes on the 2 loaded test cores, so the suite checks these twelve."""
    for game in (*ALE_SEQUENCE_GAMES, *sorted(NINE_ACTION_GAMES)):
        env = gymnasium.make(ale_env_id(game))
        obs, _ = env.reset(seed=0)
        obs, *_ = env.step(0)
        assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8, game
        assert int(env.action_space.n) == (9 if game in NINE_ACTION_GAMES else 18), game
        env.close()
