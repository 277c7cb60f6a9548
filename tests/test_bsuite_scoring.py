"""bsuite scoring on hand-made episode logs with known answers, against bsuite's own analysis where it
still runs (umbrella_length, discounting_chain, memory_len), and fed from real bsuite envs."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

import algorithms.envs  # noqa: F401
from algorithms.diagnostics import bsuite_scoring as bs


def test_logging_grid_matches_bsuite_logger():
    from bsuite.utils.wrappers import _logarithmic_logging

    ours = [e for e in range(1, 12_001) if bs.is_bsuite_logged_episode(e)]
    theirs = [e for e in range(1, 12_001) if _logarithmic_logging(e)]
    assert ours == theirs == bs.bsuite_logged_episodes(12_000).tolist()
    assert ours[:14] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 20]
    assert bs.evaluation_horizon(1130, 10_000) == 1000 and bs.evaluation_horizon(1130, 10_000, "every") == 1130
    assert bs.evaluation_horizon(12_345, 10_000) == 10_000


def test_deep_sea_solved_episode_hand_log():
    # k bad episodes then good ones: running bad fraction k/e < 0.9  <=>  e > k / 0.9.
    bad = [1] * 100 + [0] * 25  # 125 episodes; k/0.9 = 111.1
    assert bs.deep_sea_solved_episode(bad, grid="every") == 112
    assert bs.deep_sea_solved_episode(bad) == 120  # first bsuite log episode after 111
    assert bs.deep_sea_solved_episode(bad[:115]) is None  # no log episode in 112..115
    assert bs.deep_sea_solved_episode([0, 1, 1]) == 1  # a good first episode: fraction 0 at episode 1
    assert bs.deep_sea_solved_episode([1] * 50) is None
    # Only episodes <= num_episodes count.
    assert bs.deep_sea_solved_episode(bad, num_episodes=111, grid="every") is None


def test_deep_sea_solved_needs_episode_before_2_pow_n_plus_100():
    # size 10: bound 2^10 + 100 = 1124. 1000 bad episodes: first fraction < 0.9 at e = 1112.
    log = [1] * 1000 + [0] * 300
    assert bs.deep_sea_solved_episode(log, grid="every") == 1112
    assert bs.deep_sea_solved(10, 1112)
    assert bs.deep_sea_solved_episode(log) == 1200  # bsuite's rows: 1000 (fraction 1.0), then 1200
    assert not bs.deep_sea_solved(10, 1200)
    assert bs.deep_sea_solved(12, 1200)  # 2^12 + 100 = 4196
    assert not bs.deep_sea_solved(10, None)
    assert bs.deep_sea_episode_budget(10) == 1124 and bs.deep_sea_episode_budget(20) == 10_000
    assert bs.deep_sea_score({10: 1000, 12: None, 14: 5000, 16: 2**16}) == pytest.approx(3 / 4)
    assert bs.deep_sea_score({10: 1124}) == 0.0  # strict: episode < 2^N + 100


def test_umbrella_length_average_regret_and_score():
    regrets = [2.0] * 30 + [0.0] * 95  # 125 episodes
    assert bs.umbrella_length_average_regret(regrets) == pytest.approx(60 / 120)  # horizon 120
    assert bs.umbrella_length_average_regret(regrets, grid="every") == pytest.approx(60 / 125)
    assert bs.umbrella_length_average_regret([2.0] * 30 + [0.0] * 70) == pytest.approx(0.6)
    # Episodes past NUM_EPISODES are ignored.
    assert bs.umbrella_length_average_regret([0.0] * 10 + [2.0] * 5, num_episodes=10) == 0.0
    assert bs.umbrella_length_score({1: 0.2, 2: 0.6, 3: 0.49, 4: 0.5}) == 0.5
    with pytest.raises(ValueError, match="logged episode"):
        bs.umbrella_length_average_regret([])


def test_discounting_chain_score_closed_form():
    returns = [1.1] * 500 + [1.0] * 500 + [0.0] * 200  # the last 200 are past NUM_EPISODES = 1000
    r = bs.discounting_chain_average_return(returns)
    assert r == pytest.approx(1.05)
    assert bs.discounting_chain_score(r) == pytest.approx(1 - 10 * (1.1 - 1.05))
    assert bs.discounting_chain_score({0: 1.1, 1: 1.0}) == pytest.approx(0.5)
    assert bs.discounting_chain_score(1.0) == pytest.approx(0.0)
    assert bs.discounting_chain_score(0.5) == 0.0 and bs.discounting_chain_score(1.3) == 1.0


def test_memory_len_regret_ratio_and_score():
    assert bs.memory_len_regret_ratio([1] * 70 + [0] * 30) == pytest.approx(0.6)
    assert bs.memory_len_regret_ratio([1] * 60 + [0] * 40) == pytest.approx(0.8)
    assert bs.memory_len_regret_ratio([1, 0] * 50) == pytest.approx(1.0)  # random agent
    assert bs.memory_len_score({1: 0.6, 2: 0.8}) == 0.5
    assert bs.memory_len_score({1: 0.0, 2: 0.74, 3: 0.75}) == pytest.approx(2 / 3)


def _bsuite_frame(per_setting: dict, column: str, value_column: str, setting_col: str):
    """bsuite's logged rows (cumulative totals at log episodes) for per-setting per-episode values."""
    import pandas as pd

    rows = []
    for setting, values in per_setting.items():
        total = np.cumsum(values)
        for e in range(1, len(values) + 1):
            if bs.is_bsuite_logged_episode(e):
                rows.append({setting_col: setting, "episode": e, column: total[e - 1]})
    return pd.DataFrame(rows)


def test_scores_equal_bsuite_analysis_on_random_logs():
    from bsuite.experiments.discounting_chain import analysis as dc
    from bsuite.experiments.memory_len import analysis as ml
    from bsuite.experiments.umbrella_length import analysis as ul

    rng = np.random.default_rng(0)
    # umbrella: per-length error rates around the 0.25 boundary (avg regret 2 * rate vs 0.5).
    regrets = {L: 2.0 * (rng.random(int(rng.integers(30, 400))) < rate)
               for L, rate in zip(range(1, 13), np.linspace(0.05, 0.5, 12))}
    ours = bs.umbrella_length_score({L: bs.umbrella_length_average_regret(r) for L, r in regrets.items()})
    theirs = ul.score(_bsuite_frame(regrets, "total_regret", "regret", "chain_length"))
    assert 0 < ours < 1 and ours == pytest.approx(theirs)
    # memory: per-length perfect rates around 0.625 (ratio 0.75).
    perfect = {L: (rng.random(int(rng.integers(30, 400))) < p).astype(float)
               for L, p in zip(range(1, 13), np.linspace(0.5, 0.8, 12))}
    ours = bs.memory_len_score({L: bs.memory_len_regret_ratio(p) for L, p in perfect.items()})
    theirs = ml.score(_bsuite_frame(perfect, "total_perfect", "perfect", "memory_length"))
    assert 0 < ours < 1 and ours == pytest.approx(theirs)
    # discounting_chain: bsuite pools all settings at one horizon, so equal run lengths here.
    returns = {s: rng.choice([1.0, 1.1], size=250, p=[0.4, 0.6]) for s in range(5)}
    ours = bs.discounting_chain_score({s: bs.discounting_chain_average_return(r) for s, r in returns.items()})
    theirs = dc.score(_bsuite_frame(returns, "total_return", "return", "mapping_seed"))
    assert 0 < ours < 1 and ours == pytest.approx(theirs)


def _run(env: gymnasium.Env, policy, log: bs.BsuiteEpisodeLog, bsuite_id: str, max_episodes: int) -> None:
    env.reset(seed=0)
    while not log.finished(bsuite_id) and log.num_episodes(bsuite_id) < max_episodes:
        t = 0
        obs, _ = env.reset()
        while True:
            obs, _, terminated, truncated, info = env.step(policy(obs, t))
            t += 1
            if terminated or truncated:
                log.add_info(bsuite_id, info)
                break


def test_episode_log_from_real_deep_sea_runs():
    log = bs.BsuiteEpisodeLog()
    good_env = gymnasium.make("bsuite/deep_sea-0")  # size 10
    mapping = good_env.unwrapped._env._action_mapping
    _run(good_env, lambda obs, t: int(mapping[t, t]), log, "deep_sea/0", 10_000)
    assert log.num_episodes("deep_sea/0") == 1 and log.solved("deep_sea/0") and log.finished("deep_sea/0")
    bad_env = gymnasium.make("bsuite/deep_sea-1")  # size 12: always leaving the diagonal at once
    mapping12 = bad_env.unwrapped._env._action_mapping
    _run(bad_env, lambda obs, t: int(1 - mapping12[0, 0]) if t == 0 else 0, log, "deep_sea/1", 10_000)
    assert log.num_episodes("deep_sea/1") == 2**12 + 100 and not log.solved("deep_sea/1")
    assert log.episode_values("deep_sea/0", "bad") == [0.0]
    bad12 = log.episode_values("deep_sea/1", "bad")
    assert len(bad12) == 2**12 + 100 and set(bad12) == {1.0}
    assert log.episode_values("deep_sea/2", "bad") == []
    with pytest.raises(ValueError, match="allowed: return, bad, regret, perfect"):
        log.episode_values("deep_sea/0", "good")
    metrics = log.metrics()
    assert metrics["exploration/bsuite_score"] == 0.5
    assert metrics["exploration/deep_sea/solved/size_10"] == 1.0
    assert metrics["exploration/deep_sea/solved_episode/size_10"] == 1.0
    assert metrics["exploration/deep_sea/solved/size_12"] == 0.0
    assert "exploration/deep_sea/solved_episode/size_12" not in metrics
    assert metrics["exploration/deep_sea/bad_fraction/size_12"] == 1.0


def test_episode_log_from_real_umbrella_and_chain_runs():
    log = bs.BsuiteEpisodeLog(grid="every")
    _run(gymnasium.make("bsuite/umbrella_length-0"), lambda obs, t: 0, log, "umbrella_length/0", 60)
    env = gymnasium.make("bsuite/discounting_chain-1")  # mapping_seed 1: action 1 (reward at t=3) pays 1.1
    _run(env, lambda obs, t: 1, log, "discounting_chain/1", 40)
    metrics = log.metrics()
    # A fixed umbrella choice is wrong about half the time: average regret about 1 (> 0.5), score 0.
    regret = metrics["credit/umbrella_length/regret/chain_length_1"]
    assert 0.5 < regret < 1.5 and metrics["credit/bsuite_score/umbrella_length"] == 0.0
    assert metrics["credit/discounting_chain/regret/mapping_seed_1"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["credit/bsuite_score/discounting_chain"] == pytest.approx(1.0)
    assert metrics["credit/bsuite_score"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="need 'regret'"):
        log.add_episode("umbrella_length/0", episode_return=1.0)
    with pytest.raises(ValueError, match="only"):
        log.add_episode("catch/0", episode_return=1.0)
    with pytest.raises(ValueError, match="grid"):
        bs.BsuiteEpisodeLog(grid="log")


def test_episode_log_public_ids_and_budget():
    log = bs.BsuiteEpisodeLog(grid="every")
    assert log.bsuite_ids() == []
    assert log.scores_next_episode("deep_sea/0")  # nothing logged yet
    log.add_episode("umbrella_length/0", episode_return=1.0, regret=0.0)
    log.add_episode("deep_sea/0", episode_return=0.0, bad=1.0)
    assert log.bsuite_ids() == ["umbrella_length/0", "deep_sea/0"]
    assert log.experiment("deep_sea/0").kwargs["size"] == 10
    assert log.scores_next_episode("deep_sea/0") and log.scores_next_episode("umbrella_length/0")
    log.add_episode("deep_sea/0", episode_return=1.0, bad=0.0)  # bad fraction 1/2 < 0.9: solved
    assert log.solved("deep_sea/0") and not log.scores_next_episode("deep_sea/0")
    budget = log.experiment("umbrella_length/0").num_episodes
    for _ in range(budget - 1):
        log.add_episode("umbrella_length/0", episode_return=1.0, regret=0.0)
    assert log.num_episodes("umbrella_length/0") == budget and not log.scores_next_episode("umbrella_length/0")
    with pytest.raises(ValueError, match="only"):
        log.experiment("catch/0")
