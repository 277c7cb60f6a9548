"""bsuite adapter: registration of every id, flattened float32 observations, seeding, scoring info."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

import algorithms.envs  # noqa: F401  (registers bsuite/*)
from algorithms.envs.bsuite import bsuite_experiment, parse_bsuite_id
from algorithms.envs.registration import BSUITE_SWEEP_SIZES, all_bsuite_ids, bsuite_env_id


def _episode(env: gymnasium.Env, policy) -> dict:
    obs, _ = env.reset()
    t = 0
    while True:
        obs, _, terminated, truncated, info = env.step(policy(obs, t))
        t += 1
        if terminated or truncated:
            return info


def test_static_sweep_sizes_match_installed_bsuite():
    from bsuite import sweep

    assert sorted(sweep.SWEEP) == sorted(all_bsuite_ids())
    assert all(bsuite_env_id(b) in gymnasium.registry for b in sweep.SWEEP)


def test_experiment_lookup_follows_the_sweep():
    exp = bsuite_experiment("deep_sea/10")
    assert exp.kwargs["size"] == 30 and exp.num_episodes == 10_000 and exp.env_id == "bsuite/deep_sea-10"
    assert bsuite_experiment("bsuite/deep_sea-10") == exp
    chain = bsuite_experiment("bsuite/discounting_chain-3")
    assert chain.name == "discounting_chain" and chain.num_episodes == 1_000 and chain.kwargs == {"mapping_seed": 3}
    assert bsuite_experiment("umbrella_length/22").kwargs["chain_length"] == 100
    assert parse_bsuite_id("deep_sea_stochastic/0") == ("deep_sea_stochastic", 0)
    with pytest.raises(ValueError, match="0..20"):
        bsuite_experiment("deep_sea/21")
    with pytest.raises(ValueError, match="experiment one of"):
        bsuite_experiment("deepsea/1")


def test_deep_sea_spaces_and_flat_float32_observation():
    env = gymnasium.make("bsuite/deep_sea-0")  # size 10
    assert env.observation_space.shape == (100,) and env.observation_space.dtype == np.float32
    assert env.action_space == gymnasium.spaces.Discrete(2)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (100,) and obs[0] == 1.0 and obs.sum() == 1.0


def test_deep_sea_info_marks_bad_and_good_episodes():
    env = gymnasium.make("bsuite/deep_sea-0")
    mapping = env.unwrapped._env._action_mapping  # the real env's per-cell 'right' action
    size = 10

    def optimal(obs, t):  # on the diagonal: row == column == t
        return int(mapping[t, t])

    def always_left(obs, t):
        return int(1 - mapping[t, t]) if t == 0 else 0

    bad = _episode(env, always_left)["bsuite"]
    assert bad["episode"] == 1 and bad["episode_bad_episodes"] == 1 and bad["total_bad_episodes"] == 1
    assert bad["episode_length"] == size
    good = _episode(env, optimal)["bsuite"]
    assert good["episode"] == 2 and good["episode_bad_episodes"] == 0 and good["total_bad_episodes"] == 1
    # Optimal return: +1 at the bottom-right minus the move cost 0.01 / N per right move.
    assert good["episode_return"] == pytest.approx(1.0 - 0.01)


def test_umbrella_and_memory_info_give_per_episode_regret():
    env = gymnasium.make("bsuite/umbrella_length-2")  # chain_length 3
    regrets, returns = [], []
    for _ in range(20):
        info = _episode(env, lambda obs, t: 0)["bsuite"]
        regrets.append(info["episode_regret"])
        returns.append(info["episode_return"])
    assert set(regrets) <= {0.0, 2.0} and 0 < sum(regrets) < 40  # a fixed action is right about half the time
    env = gymnasium.make("bsuite/memory_len-0")  # memory_length 1

    def answer(obs, t):  # the context bit is shown at t=0 as +-1; the answer is at the last step
        answer.context = int(obs[2] > 0) if t == 0 else answer.context
        return answer.context

    for _ in range(10):
        info = _episode(env, answer)["bsuite"]
        assert info["episode_perfect"] == 1 and info["episode_regret"] == 0 and info["episode_return"] == 1.0


def test_same_seed_same_trajectory():
    for env_id in ("bsuite/umbrella_length-5", "bsuite/cartpole_noise-3", "bsuite/deep_sea_stochastic-0"):
        runs = []
        for _ in range(2):
            env = gymnasium.make(env_id)
            obs, _ = env.reset(seed=11)
            trace = [obs]
            rng = np.random.default_rng(0)
            for _ in range(60):
                obs, r, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
                trace.append(np.append(obs, r))
                if terminated or truncated:
                    obs, _ = env.reset()
            runs.append(np.concatenate(trace))
        np.testing.assert_array_equal(runs[0], runs[1], err_msg=env_id)


def test_mnist_without_local_files_fails_clearly(tmp_path, monkeypatch):
    import algorithms.envs.bsuite as bsuite_env

    monkeypatch.setattr(bsuite_env, "_MNIST_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="MNIST"):
        gymnasium.make("bsuite/mnist-0")


@pytest.mark.parametrize("experiment", sorted(n for n in BSUITE_SWEEP_SIZES if not n.startswith("mnist")))
def test_every_bsuite_id_loads_and_steps(experiment):
    for index in range(BSUITE_SWEEP_SIZES[experiment]):
        env = gymnasium.make(f"bsuite/{experiment}-{index}")
        obs, _ = env.reset(seed=0)
        assert obs.dtype == np.float32 and obs.ndim == 1 and env.observation_space.contains(obs)
        obs, reward, *_ = env.step(env.action_space.sample())
        assert obs.shape == env.observation_space.shape and np.isfinite(reward)


def test_scoring_info_survives_rllib_env_runner_and_feeds_the_log():
    """What an RLlib callback sees: info["bsuite"] on each episode's last step, from vectorised copies."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from algorithms.diagnostics.bsuite_scoring import BsuiteEpisodeLog

    runner = SingleAgentEnvRunner(
        config=PPOConfig().environment("bsuite/deep_sea-0").env_runners(num_envs_per_env_runner=2)
    )
    try:
        episodes = runner.sample(num_episodes=6, random_actions=True)
        log = BsuiteEpisodeLog(grid="every")
        for episode in episodes:
            assert episode.is_done and len(episode) == 10
            log.add_info("deep_sea/0", episode.get_infos(-1))
        assert log.num_episodes("deep_sea/0") == 6
        bad = log.metrics()["exploration/deep_sea/bad_fraction/size_10"]
        assert bad in {k / 6 for k in range(7)}
    finally:
        runner.stop()
