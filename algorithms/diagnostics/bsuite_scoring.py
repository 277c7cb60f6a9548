"""bsuite scores for deep_sea, umbrella_length, discounting_chain and memory_len on per-episode logs.

Definitions: bsuite 0.3.6 `experiments/<name>/analysis.py` (Osband et al., "Behaviour Suite for
Reinforcement Learning", ICLR 2020; docs/methods.md#credit-and-convergence), rewritten on
plain sequences (bsuite's own analysis needs pandas < 2). Per-episode inputs are what
`algorithms.envs.bsuite.BsuiteEnv` puts in `info["bsuite"]` at each episode end.

Evaluation grid. bsuite's logger writes a row only at log-spaced episodes
    1, 2, ..., 10, then 10^k x {1.2, 1.4, 1.7, 2, 2.5, 3, 4, 5, 6, 7, 8, 9, 10}  (k >= 1)
and its analysis sees only those rows. With `grid="bsuite"` (default) every function here evaluates
exactly at those episodes, so scores equal bsuite's; `grid="every"` evaluates after every episode.

Horizon. For the average-over-episodes scores bsuite uses the last logged episode
h = last grid episode <= min(episodes run, NUM_EPISODES) of the run, and the average over episodes
1..h (its counters are cumulative). Several seeds of one setting: bsuite averages the per-seed averages
(equal horizons); do the same with the per-setting functions before scoring.

Scores (each in [0, 1]):
- deep_sea (size N): solved at the first grid episode e <= NUM_EPISODES (10,000) with
  (bad episodes in 1..e) / e < 0.9; score = fraction of sizes solved with e < 2^N + 100.
- umbrella_length (chain length L): average regret = (sum of episode regrets in 1..h) / h, where an
  episode's regret is 2 when the umbrella choice was wrong, else 0; score = fraction of lengths with
  average regret < 0.5.
- discounting_chain: average return r = (sum of episode returns in 1..h) / h per setting, averaged
  over the settings; score = clip(1 - 10 (1.1 - r), 0, 1). Per-setting regret = 1.1 - r.
- memory_len (memory length L): regret ratio = (h - perfect episodes in 1..h) / 0.5 / h (a random
  agent is perfect half the time, ratio 1); score = fraction of lengths with ratio < 0.75.
"""

from __future__ import annotations

import array
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

Grid = Literal["bsuite", "every"]

DEEP_SEA_THRESHOLD = 0.9
"""deep_sea is solved once the running fraction of bad episodes drops below this."""
DEEP_SEA_FORGIVENESS = 100.0
"""deep_sea counts as solved for the score only before episode 2^N + this."""
DEEP_SEA_NUM_EPISODES = 10_000
UMBRELLA_LENGTH_NUM_EPISODES = 10_000
UMBRELLA_REGRET_THRESHOLD = 0.5
DISCOUNTING_CHAIN_NUM_EPISODES = 1_000
DISCOUNTING_CHAIN_OPTIMAL_RETURN = 1.1
MEMORY_LEN_NUM_EPISODES = 10_000
MEMORY_LEN_THRESHOLD = 0.75
MEMORY_BASE_RATE = 0.5
"""probability that a random agent answers a memory episode correctly"""

_LOG_RATIOS_X10 = (10, 12, 14, 17, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100)


def is_bsuite_logged_episode(episode: int) -> bool:
    """True at the episodes bsuite's logger records: 10^k x {1, 1.2, 1.4, 1.7, 2, 2.5, 3, ..., 10},
    k = floor(log10(episode)) (bsuite.utils.wrappers._logarithmic_logging)."""
    if episode < 1:
        return False
    scale = 10 ** (len(str(int(episode))) - 1)
    return any(episode * 10 == scale * r for r in _LOG_RATIOS_X10)


def bsuite_logged_episodes(up_to: int) -> np.ndarray:
    """All episodes e <= up_to that bsuite's logger records, ascending (see `is_bsuite_logged_episode`)."""
    found: set[int] = set()
    scale = 1
    while scale <= up_to:
        found.update(scale * r // 10 for r in _LOG_RATIOS_X10 if scale * r // 10 <= up_to)
        scale *= 10
    return np.array(sorted(found), dtype=np.int64)


def _check_grid(grid: str) -> None:
    if grid not in ("bsuite", "every"):
        raise ValueError(f"grid must be one of ['bsuite', 'every']; got {grid!r}")


def evaluation_horizon(num_logged: int, num_episodes: int, grid: Grid = "bsuite") -> int:
    """h = the last evaluation episode <= min(num_logged, num_episodes); 0 when there is none."""
    _check_grid(grid)
    h = min(int(num_logged), int(num_episodes))
    if grid == "bsuite":
        while h > 0 and not is_bsuite_logged_episode(h):
            h -= 1
    return h


def average_over_horizon(values: Sequence[float], num_episodes: int, grid: Grid = "bsuite") -> float:
    """(sum_{e=1..h} values[e]) / h with h = `evaluation_horizon(len(values), num_episodes, grid)`.

    This is bsuite's `total_<x>` at episode h divided by h. Raises if no episode is evaluated yet."""
    h = evaluation_horizon(len(values), num_episodes, grid)
    if h == 0:
        raise ValueError("no evaluated episode yet: need at least one logged episode")
    return float(np.sum(np.asarray(values[:h], dtype=np.float64)) / h)


def deep_sea_solved_episode(
    bad_episodes: Sequence[float],
    threshold: float = DEEP_SEA_THRESHOLD,
    num_episodes: int = DEEP_SEA_NUM_EPISODES,
    grid: Grid = "bsuite",
) -> int | None:
    """First evaluation episode e <= num_episodes with (sum_{i<=e} bad_i) / e < threshold, else None.

    `bad_episodes[i]` is 1 when episode i+1 left the optimal path (bsuite's `total_bad_episodes` delta).
    Source: bsuite deep_sea/analysis.py `find_solution`."""
    _check_grid(grid)
    bad = np.asarray(bad_episodes, dtype=np.float64)[:num_episodes]
    n = len(bad)
    episodes = bsuite_logged_episodes(n) if grid == "bsuite" else np.arange(1, n + 1)
    hits = np.flatnonzero(np.cumsum(bad)[episodes - 1] / episodes < threshold)
    return int(episodes[hits[0]]) if len(hits) else None


def deep_sea_solved(size: int, solved_episode: int | None, forgiveness: float = DEEP_SEA_FORGIVENESS) -> bool:
    """bsuite's 'beats dithering' test: solved at an episode e < 2^size + forgiveness."""
    return solved_episode is not None and solved_episode < 2.0**size + forgiveness


def deep_sea_episode_budget(
    size: int, num_episodes: int = DEEP_SEA_NUM_EPISODES, forgiveness: float = DEEP_SEA_FORGIVENESS
) -> int:
    """min(2^N + 100, 10,000): after this many episodes a size can no longer count as solved."""
    return int(min(2**size + forgiveness, num_episodes))


def deep_sea_score(
    solved_episode_by_size: Mapping[int, int | None], forgiveness: float = DEEP_SEA_FORGIVENESS
) -> float:
    """Fraction of sizes N whose solved episode is < 2^N + 100 (bsuite deep_sea/analysis.py `score`)."""
    if not solved_episode_by_size:
        raise ValueError("deep_sea_score needs at least one size")
    return float(np.mean([deep_sea_solved(n, e, forgiveness) for n, e in solved_episode_by_size.items()]))


def umbrella_length_average_regret(
    episode_regrets: Sequence[float], num_episodes: int = UMBRELLA_LENGTH_NUM_EPISODES, grid: Grid = "bsuite"
) -> float:
    """Average regret (sum of episode regrets in 1..h) / h; an episode's regret is 2 for a wrong choice."""
    return average_over_horizon(episode_regrets, num_episodes, grid)


def umbrella_length_score(
    average_regret_by_length: Mapping[int, float], threshold: float = UMBRELLA_REGRET_THRESHOLD
) -> float:
    """Fraction of chain lengths with average regret < 0.5 (bsuite umbrella_length/analysis.py)."""
    if not average_regret_by_length:
        raise ValueError("umbrella_length_score needs at least one chain length")
    return float(np.mean([r < threshold for r in average_regret_by_length.values()]))


def discounting_chain_average_return(
    episode_returns: Sequence[float], num_episodes: int = DISCOUNTING_CHAIN_NUM_EPISODES, grid: Grid = "bsuite"
) -> float:
    """Average episode return (sum of returns in 1..h) / h of one discounting_chain setting."""
    return average_over_horizon(episode_returns, num_episodes, grid)


def discounting_chain_score(average_return: float | Mapping[Any, float]) -> float:
    """clip(1 - 10 (1.1 - r), 0, 1), r the average return (averaged over settings when given a mapping).

    Source: bsuite discounting_chain/analysis.py `score`."""
    if isinstance(average_return, Mapping):
        if not average_return:
            raise ValueError("discounting_chain_score needs at least one setting")
        average_return = float(np.mean(list(average_return.values())))
    return float(np.clip(1.0 - 10.0 * (DISCOUNTING_CHAIN_OPTIMAL_RETURN - average_return), 0.0, 1.0))


def memory_len_regret_ratio(
    perfect_episodes: Sequence[float], num_episodes: int = MEMORY_LEN_NUM_EPISODES, grid: Grid = "bsuite"
) -> float:
    """(h - perfect episodes in 1..h) / 0.5 / h: 0 for a perfect agent, 1 for a random one."""
    return (1.0 - average_over_horizon(perfect_episodes, num_episodes, grid)) / MEMORY_BASE_RATE


def memory_len_score(regret_ratio_by_length: Mapping[int, float], threshold: float = MEMORY_LEN_THRESHOLD) -> float:
    """Fraction of memory lengths with regret ratio < 0.75 (bsuite memory_len/analysis.py)."""
    if not regret_ratio_by_length:
        raise ValueError("memory_len_score needs at least one memory length")
    return float(np.mean([r < threshold for r in regret_ratio_by_length.values()]))


SCORED_EXPERIMENTS = ("deep_sea", "umbrella_length", "discounting_chain", "memory_len")
_SETTING_KEY = {"deep_sea": "size", "umbrella_length": "chain_length", "discounting_chain": "mapping_seed",
                "memory_len": "memory_length"}


class BsuiteEpisodeLog:
    """Episode-by-episode log of one or more bsuite ids of the scored experiments, and their scores.

    Feed it from an RL callback at each episode end with `add_info(bsuite_id, info)` (the env's
    `info["bsuite"]`) or `add_episode(...)`; read `solved`, `finished`, `scores()` and `metrics()`.
    Episodes of one id from several env copies are taken in arrival order, as the agent saw them.

    `metrics()` keys (the project's result-key groups):
      exploration/bsuite_score                               deep_sea score over the logged sizes
      exploration/deep_sea/{solved,solved_episode,bad_fraction,episodes}/size_<N>
      credit/bsuite_score                                    mean of umbrella_length, discounting_chain
      credit/bsuite_score/<experiment>                       umbrella_length, discounting_chain, memory_len
      credit/umbrella_length/regret/chain_length_<L>         average regret
      credit/discounting_chain/regret/mapping_seed_<s>       1.1 - average return
      credit/memory_len/regret_ratio/memory_length_<L>
    `bad_fraction` is the running fraction of bad episodes over all episodes so far.
    """

    def __init__(self, grid: Grid = "bsuite"):
        _check_grid(grid)
        self.grid = grid
        self._records: dict[str, dict[str, array.array]] = {}
        self._solved_at: dict[str, int | None] = {}
        self._experiments: dict[str, Any] = {}

    def experiment(self, bsuite_id: str):
        """The scored experiment of ``bsuite_id`` (:class:`algorithms.envs.bsuite.BsuiteExperiment`); raises
        for ids of experiments not scored here."""
        if bsuite_id not in self._experiments:
            from algorithms.envs.bsuite import bsuite_experiment

            exp = bsuite_experiment(bsuite_id)
            if exp.name not in SCORED_EXPERIMENTS:
                raise ValueError(f"bsuite id {bsuite_id!r}: only {list(SCORED_EXPERIMENTS)} are scored here")
            self._experiments[bsuite_id] = exp
        return self._experiments[bsuite_id]

    def add_episode(
        self,
        bsuite_id: str,
        *,
        episode_return: float,
        bad: float | None = None,
        regret: float | None = None,
        perfect: float | None = None,
    ) -> None:
        """One finished episode: its return, and what its experiment scores (deep_sea: `bad`,
        umbrella_length: `regret`, memory_len: `perfect`; discounting_chain: the return)."""
        exp = self.experiment(bsuite_id)
        needed = {"deep_sea": ("bad", bad), "umbrella_length": ("regret", regret),
                  "memory_len": ("perfect", perfect)}.get(exp.name)
        if needed is not None and needed[1] is None:
            raise ValueError(f"{exp.name} episodes need {needed[0]!r}")
        rec = self._records.setdefault(
            exp.bsuite_id, {k: array.array("d") for k in ("return", "bad", "regret", "perfect")}
        )
        rec["return"].append(float(episode_return))
        for key, value in (("bad", bad), ("regret", regret), ("perfect", perfect)):
            if value is not None:
                rec[key].append(float(value))
        n = len(rec["return"])
        if exp.name == "deep_sea" and self._solved_at.get(exp.bsuite_id) is None and n <= exp.num_episodes:
            # The first solving episode never changes once found, and can only be the newest episode,
            # so the rule is re-evaluated only at evaluation episodes until it first holds.
            if self.grid == "every" or is_bsuite_logged_episode(n):
                self._solved_at[exp.bsuite_id] = deep_sea_solved_episode(
                    rec["bad"], num_episodes=exp.num_episodes, grid=self.grid
                )

    def add_info(self, bsuite_id: str, info: Mapping[str, Any]) -> None:
        """One episode from `BsuiteEnv`'s end-of-episode info (`info` or `info["bsuite"]`)."""
        info = info.get("bsuite", info)
        self.add_episode(
            bsuite_id,
            episode_return=info["episode_return"],
            bad=info.get("episode_bad_episodes"),
            regret=info.get("episode_regret"),
            perfect=info.get("episode_perfect"),
        )

    def bsuite_ids(self) -> list[str]:
        """The bsuite ids with at least one logged episode, in the order they were first logged."""
        return list(self._records)

    def scores_next_episode(self, bsuite_id: str) -> bool:
        """Whether one more episode of ``bsuite_id`` would count: False once a deep_sea run is finished
        (solved or out of budget) or another experiment has its ``NUM_EPISODES``, since bsuite's analysis
        reads no episode beyond that."""
        exp = self.experiment(bsuite_id)
        if exp.name == "deep_sea":
            return not self.finished(bsuite_id)
        return self.num_episodes(bsuite_id) < exp.num_episodes

    def num_episodes(self, bsuite_id: str) -> int:
        rec = self._records.get(self.experiment(bsuite_id).bsuite_id)
        return len(rec["return"]) if rec else 0

    def episode_values(self, bsuite_id: str, key: str) -> list[float]:
        """The logged per-episode ``key`` ("return", "bad", "regret" or "perfect") of ``bsuite_id``, oldest first."""
        if key not in ("return", "bad", "regret", "perfect"):
            raise ValueError(f"episode_values: key {key!r}; allowed: return, bad, regret, perfect")
        rec = self._records.get(self.experiment(bsuite_id).bsuite_id)
        return list(rec[key]) if rec else []

    def solved_episode(self, bsuite_id: str) -> int | None:
        """deep_sea: the episode at which the bad fraction first dropped below 0.9, else None."""
        exp = self.experiment(bsuite_id)
        if exp.name != "deep_sea":
            raise ValueError(f"solved_episode is defined for deep_sea only; got {bsuite_id!r}")
        return self._solved_at.get(exp.bsuite_id)

    def solved(self, bsuite_id: str) -> bool:
        """deep_sea: solved by bsuite's rule (before episode 2^N + 100)."""
        return deep_sea_solved(self.experiment(bsuite_id).kwargs["size"], self.solved_episode(bsuite_id))

    def finished(self, bsuite_id: str) -> bool:
        """True when the run can stop: deep_sea solved or past min(2^N + 100, 10,000) episodes;
        other experiments at their NUM_EPISODES."""
        exp = self.experiment(bsuite_id)
        if exp.name == "deep_sea":
            return self.solved(bsuite_id) or self.num_episodes(bsuite_id) >= deep_sea_episode_budget(exp.kwargs["size"])
        return self.num_episodes(bsuite_id) >= exp.num_episodes

    def _per_setting(self, name: str) -> dict[Any, float]:
        """Per-setting quantity of an experiment: deep_sea solved episode, else the averaged regret/return."""
        out: dict[Any, Any] = {}
        for bsuite_id, rec in self._records.items():
            exp = self._experiments[bsuite_id]
            if exp.name != name or evaluation_horizon(len(rec["return"]), exp.num_episodes, self.grid) == 0:
                continue
            setting = exp.kwargs[_SETTING_KEY[name]]
            if name == "deep_sea":
                out[setting] = self._solved_at.get(bsuite_id)
            elif name == "umbrella_length":
                out[setting] = umbrella_length_average_regret(rec["regret"], exp.num_episodes, self.grid)
            elif name == "discounting_chain":
                out[setting] = discounting_chain_average_return(rec["return"], exp.num_episodes, self.grid)
            else:
                out[setting] = memory_len_regret_ratio(rec["perfect"], exp.num_episodes, self.grid)
        return out

    def scores(self) -> dict[str, float]:
        """bsuite score of each scored experiment with at least one evaluated episode."""
        score_fns = {"deep_sea": deep_sea_score, "umbrella_length": umbrella_length_score,
                     "discounting_chain": discounting_chain_score, "memory_len": memory_len_score}
        out = {}
        for name, fn in score_fns.items():
            per_setting = self._per_setting(name)
            if per_setting:
                out[name] = fn(per_setting)
        return out

    def metrics(self) -> dict[str, float]:
        """Flat result keys (see the class docstring) for what has been logged so far."""
        scores = self.scores()
        out: dict[str, float] = {}
        if "deep_sea" in scores:
            out["exploration/bsuite_score"] = scores["deep_sea"]
        credit = [scores[n] for n in ("umbrella_length", "discounting_chain") if n in scores]
        if credit:
            out["credit/bsuite_score"] = float(np.mean(credit))
        for name in ("umbrella_length", "discounting_chain", "memory_len"):
            if name in scores:
                out[f"credit/bsuite_score/{name}"] = scores[name]
        for bsuite_id, rec in self._records.items():
            exp = self._experiments[bsuite_id]
            n = len(rec["return"])
            if exp.name == "deep_sea":
                size = exp.kwargs["size"]
                solved_at = self._solved_at.get(bsuite_id)
                out[f"exploration/deep_sea/solved/size_{size}"] = float(deep_sea_solved(size, solved_at))
                if solved_at is not None:
                    out[f"exploration/deep_sea/solved_episode/size_{size}"] = float(solved_at)
                out[f"exploration/deep_sea/bad_fraction/size_{size}"] = float(np.mean(rec["bad"])) if n else 1.0
                out[f"exploration/deep_sea/episodes/size_{size}"] = float(n)
        for setting, regret in self._per_setting("umbrella_length").items():
            out[f"credit/umbrella_length/regret/chain_length_{setting}"] = regret
        for setting, ret in self._per_setting("discounting_chain").items():
            out[f"credit/discounting_chain/regret/mapping_seed_{setting}"] = DISCOUNTING_CHAIN_OPTIMAL_RETURN - ret
        for setting, ratio in self._per_setting("memory_len").items():
            out[f"credit/memory_len/regret_ratio/memory_length_{setting}"] = ratio
        return out
