"""MinAtar adapter: HWC float32 observations, action sets, seeding, sticky actions, stepping."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

import algorithms.envs  # noqa: F401
from algorithms.envs.registration import MINATAR_GAMES

CHANNELS = {"asterix": 4, "breakout": 4, "freeway": 7, "seaquest": 10, "space_invaders": 6}
MINIMAL_ACTIONS = {"asterix": 5, "breakout": 3, "freeway": 3, "seaquest": 6, "space_invaders": 4}


def _trace(env: gymnasium.Env, seed: int, actions) -> np.ndarray:
    obs, _ = env.reset(seed=seed)
    out = [obs.ravel()]
    for a in actions:
        obs, r, terminated, truncated, _ = env.step(a)
        out.append(np.append(obs.ravel(), [r, terminated]))
        if terminated or truncated:
            obs, _ = env.reset()
    return np.concatenate(out)


@pytest.mark.parametrize("game", MINATAR_GAMES)
def test_spaces_dtypes_and_stepping(game):
    env = gymnasium.make(f"minatar/{game}")
    assert env.observation_space == gymnasium.spaces.Box(0.0, 1.0, (10, 10, CHANNELS[game]), np.float32)
    assert env.action_space == gymnasium.spaces.Discrete(6)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (10, 10, CHANNELS[game]) and set(np.unique(obs)) <= {0.0, 1.0}
    rng = np.random.default_rng(0)
    for _ in range(200):
        obs, reward, terminated, truncated, _ = env.step(int(rng.integers(6)))
        assert env.observation_space.contains(obs) and np.isfinite(reward)
        if terminated:
            obs, _ = env.reset()
    minimal = gymnasium.make(f"minatar/{game}", minimal_action_set=True)
    assert minimal.action_space == gymnasium.spaces.Discrete(MINIMAL_ACTIONS[game])


def test_passes_gymnasium_env_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(gymnasium.make("minatar/breakout").unwrapped, skip_render_check=True)


def test_same_seed_same_trajectory_with_sticky_actions():
    actions = np.random.default_rng(1).integers(6, size=400)
    for game in ("breakout", "asterix"):
        a = _trace(gymnasium.make(f"minatar/{game}"), 3, actions)
        b = _trace(gymnasium.make(f"minatar/{game}"), 3, actions)
        np.testing.assert_array_equal(a, b)
        c = _trace(gymnasium.make(f"minatar/{game}"), 4, actions)
        assert a.shape != c.shape or not np.array_equal(a, c)


def test_sticky_actions_repeat_previous_action():
    # Breakout: with sticky probability 1 the first action (no-op, set at reset) repeats forever, so
    # the paddle (channel 0) never moves; with probability 0 'left' moves it.
    always_sticky = gymnasium.make("minatar/breakout", sticky_action_prob=1.0)
    obs, _ = always_sticky.reset(seed=0)
    for _ in range(3):
        new_obs, *_ = always_sticky.step(1)
        np.testing.assert_array_equal(new_obs[..., 0], obs[..., 0])
    never_sticky = gymnasium.make("minatar/breakout", sticky_action_prob=0.0)
    obs, _ = never_sticky.reset(seed=0)
    new_obs, *_ = never_sticky.step(1)
    assert np.argmax(new_obs[9, :, 0]) == np.argmax(obs[9, :, 0]) - 1


def test_max_episode_steps_truncates():
    env = gymnasium.make("minatar/freeway", max_episode_steps=5)  # freeway never terminates this early
    env.reset(seed=0)
    flags = [env.step(0)[2:4] for _ in range(5)]
    assert flags == [(False, False)] * 4 + [(False, True)]


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="game must be one of"):
        gymnasium.make("minatar/breakout", game="pong")
    with pytest.raises(ValueError, match="sticky_action_prob"):
        gymnasium.make("minatar/breakout", sticky_action_prob=1.5)
