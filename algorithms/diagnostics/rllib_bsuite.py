"""Diagnostic ``bsuite``: bsuite scores of RLlib runs on ``bsuite/<experiment>-<index>`` envs.

Spec: ``diagnostics: {bsuite: {stop_when_finished: true}}`` (see :class:`BsuiteSettings`).

How episodes reach the score (any RLlib algorithm):
- RLlib's own env runners (PPO, DQN, ...): ``on_episode_end`` reads the env's end-of-episode
  ``info["bsuite"]`` (:class:`algorithms.envs.bsuite.BsuiteEnv`) and logs it as an item;
- the off-policy core's runners (EVE): the runner wraps its envs in :class:`BsuiteEpisodeRecorder`
  and logs the finished episodes itself once ``record_bsuite_episodes`` is set, which this callback
  does on every env runner in ``on_algorithm_init``;
- in the driver, ``on_train_result`` feeds the items (key :data:`BSUITE_EPISODES_KEY` of
  ``env_runners``, removed from the result) in arrival order into the trial's
  :class:`~algorithms.diagnostics.bsuite_scoring.BsuiteEpisodeLog` and adds its metrics
  (``exploration/bsuite_score``, ``credit/bsuite_score``, per-setting regrets; see that class).
  The log is part of the algorithm's checkpoints (state key :data:`BSUITE_STATE_KEY`).

Budgets: deep_sea runs are finished once solved (bsuite's rule) or after min(2^N + 100, 10,000)
episodes, other experiments after their ``NUM_EPISODES``. Then ``exploration/deep_sea_finished`` /
``credit/bsuite_finished`` is 1 (a ``stop`` key for specs) and, with ``stop_when_finished``, the
result's ``done`` is set so Tune ends the trial. Episodes beyond a budget are not scored (bsuite's
analysis only reads episodes up to ``NUM_EPISODES``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import gymnasium as gym
from pydantic import BaseModel, ConfigDict
from ray.rllib.callbacks.callbacks import RLlibCallback

from algorithms.diagnostics.bsuite_scoring import BsuiteEpisodeLog
from algorithms.diagnostics.registry import register_diagnostic

BSUITE_EPISODES_KEY = "bsuite_episodes"
BSUITE_STATE_KEY = "bsuite_episode_log"
_ATTR = "_bsuite_episode_log"


class BsuiteSettings(BaseModel):
    """Settings of diagnostic ``bsuite`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    stop_when_finished: bool = True
    """Set ``done`` once every logged bsuite id is finished (deep_sea solved or out of budget)."""
    grid: Literal["bsuite", "every"] = "bsuite"
    """Evaluate at bsuite's logged episodes (equal to bsuite's scores) or after every episode."""


def _bsuite_id_of(env: gym.Env) -> str | None:
    try:
        experiment = env.get_wrapper_attr("experiment")
    except AttributeError:
        return None
    return getattr(experiment, "bsuite_id", None)


class BsuiteEpisodeRecorder(gym.Wrapper):
    """Keeps each finished bsuite episode's ``{"bsuite_id", **info["bsuite"]}`` until :meth:`drain`.

    A pass-through for envs without bsuite info."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.bsuite_id = _bsuite_id_of(env)
        self.finished: list[dict[str, Any]] = []

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.bsuite_id is not None and "bsuite" in info:
            self.finished.append({"bsuite_id": self.bsuite_id, **info["bsuite"]})
        return obs, reward, terminated, truncated, info

    def drain(self) -> list[dict[str, Any]]:
        out, self.finished = self.finished, []
        return out


def log_bsuite_episodes(metrics_logger: Any, records: Iterable[dict[str, Any]]) -> None:
    """Log finished-episode records as items (RLlib's ``item_series``: kept as a list, not reduced)."""
    for record in records:
        metrics_logger.log_value(BSUITE_EPISODES_KEY, dict(record), reduce="item_series")


def _flatten_items(items: Any) -> list[dict[str, Any]]:
    if items is None:
        return []
    if isinstance(items, dict):
        return [items]
    out: list[dict[str, Any]] = []
    for x in items:
        out.extend(_flatten_items(x) if not isinstance(x, dict) else [x])
    return out


def _install_persistence(algorithm: Any) -> None:
    """Make ``algorithm.get_state`` / ``set_state`` carry the episode log (idempotent)."""
    if getattr(algorithm, "_bsuite_persistence", False):
        return
    orig_get, orig_set = algorithm.get_state, algorithm.set_state

    def get_state(components=None, *, not_components=None, **kwargs):
        state = orig_get(components, not_components=not_components, **kwargs)
        wanted = components is None or BSUITE_STATE_KEY in ([components] if isinstance(components, str)
                                                             else list(components))
        log = getattr(algorithm, _ATTR, None)
        if log is not None and wanted:
            state[BSUITE_STATE_KEY] = log
        return state

    def set_state(state, *args, **kwargs):
        if BSUITE_STATE_KEY in state:
            state = dict(state)
            setattr(algorithm, _ATTR, state.pop(BSUITE_STATE_KEY))
        return orig_set(state, *args, **kwargs)

    algorithm.get_state = get_state
    algorithm.set_state = set_state
    algorithm._bsuite_persistence = True


def bsuite_result_metrics(log: BsuiteEpisodeLog) -> dict[str, float]:
    """The log's metrics plus the finished flags (``exploration/deep_sea_finished``, ``credit/bsuite_finished``)."""
    out = log.metrics()
    ids = log.bsuite_ids()
    deep = [i for i in ids if i.startswith("deep_sea/")]
    other = [i for i in ids if not i.startswith("deep_sea/")]
    if deep:
        out["exploration/deep_sea_finished"] = float(all(log.finished(i) for i in deep))
        out["exploration/deep_sea_solved"] = float(all(log.solved(i) for i in deep))
    if other:
        out["credit/bsuite_finished"] = float(all(log.finished(i) for i in other))
    return out


def _nest(result: dict[str, Any], flat: dict[str, float]) -> None:
    """Write ``group/a/b`` keys into the nested result (Tune flattens it back with '/')."""
    for key, value in flat.items():
        group, rest = key.split("/", 1)
        node = result.setdefault(group, {})
        if not isinstance(node, dict):
            result[key] = value
            continue
        node[rest] = value


def make_bsuite_callback(settings: BsuiteSettings) -> type[RLlibCallback]:
    class BsuiteCallback(RLlibCallback):
        """Scores bsuite episodes in the driver; see algorithms.diagnostics.rllib_bsuite."""

        def on_algorithm_init(self, *, algorithm: Any, metrics_logger: Any = None, **kwargs: Any) -> None:
            _install_persistence(algorithm)
            if getattr(algorithm, _ATTR, None) is None:
                setattr(algorithm, _ATTR, BsuiteEpisodeLog(grid=settings.grid))

            def enable(runner: Any) -> None:
                if hasattr(runner, "record_bsuite_episodes"):
                    runner.record_bsuite_episodes = True

            algorithm.env_runner_group.foreach_env_runner(enable, local_env_runner=True)

        def on_episode_end(self, *, episode: Any, metrics_logger: Any = None, env: Any = None,
                           env_index: int = 0, **kwargs: Any) -> None:
            # RLlib's own env runners: the last info of the episode carries the bsuite record.
            try:
                info = episode.get_infos(-1)
            except (AttributeError, IndexError, TypeError):
                return
            if not isinstance(info, dict) or "bsuite" not in info or metrics_logger is None:
                return
            bsuite_id = None
            if env is not None:
                envs = getattr(env, "envs", None)
                bsuite_id = _bsuite_id_of(envs[env_index] if envs else env)
            if bsuite_id is not None:
                log_bsuite_episodes(metrics_logger, [{"bsuite_id": bsuite_id, **info["bsuite"]}])

        def on_train_result(self, *, algorithm: Any, metrics_logger: Any = None, result: dict, **kwargs: Any
                            ) -> None:
            runners = result.get("env_runners")
            items = runners.pop(BSUITE_EPISODES_KEY, None) if isinstance(runners, dict) else None
            log: BsuiteEpisodeLog = getattr(algorithm, _ATTR, None) or BsuiteEpisodeLog(grid=settings.grid)
            setattr(algorithm, _ATTR, log)
            for record in _flatten_items(items):
                bsuite_id = record["bsuite_id"]
                if log.scores_next_episode(bsuite_id):
                    log.add_info(bsuite_id, record)
            metrics = bsuite_result_metrics(log)
            _nest(result, metrics)
            finished = [v for k, v in metrics.items() if k.endswith("_finished")]
            if settings.stop_when_finished and finished and all(v == 1.0 for v in finished):
                result["done"] = True

    return BsuiteCallback


register_diagnostic("bsuite", BsuiteSettings, rllib_callback=make_bsuite_callback)
