"""bsuite experiments as gymnasium environments (`bsuite/<experiment>-<index>` for bsuite id
`<experiment>/<index>`), through shimmy's `BSuiteCompatibilityV0`.

A bsuite id indexes its experiment's sweep: `deep_sea/10` is `bsuite.sweep.SETTINGS['deep_sea/10'] ==
{'size': 30, 'mapping_seed': 42}`. The setting (including any mapping seed) fixes the problem instance;
`reset(seed=...)` seeds only the environment's own randomness (every RandomState in the env and its
bsuite wrappers), so equal seeds and actions give equal trajectories.

On top of shimmy this adapter
- flattens observations to float32 vectors (`deep_sea` N x N -> N^2),
- replaces shimmy's info (dm_env step types) with scoring information: at every episode end
  `info["bsuite"]` holds
  `episode` (episodes completed by this env, 1-based), `episode_return`, `episode_length`, the
  environment's cumulative `bsuite_info()` counters as bsuite logs them (`total_bad_episodes`,
  `denoised_return` for deep_sea; `total_regret` for umbrella; `total_perfect`, `total_regret` for
  memory) and, for each counter `total_<x>` (or other key `<x>`), its change in this episode as
  `episode_<x>` (e.g. `episode_bad_episodes` is 1 for a bad deep_sea episode, `episode_regret` is 2 for
  a wrong umbrella choice). `algorithms.diagnostics.bsuite_scoring.BsuiteEpisodeLog.add_info` reads it.

bsuite environments count episodes themselves (their counters live in the env object and survive
`reset`), so one env instance must be used for one run; the experiment's episode budget is
`bsuite_experiment(id).num_episodes` (`NUM_EPISODES` of its sweep). Stopping at the budget is the
training loop's job.

The `mnist*` experiments need the MNIST files in /tmp/mnist (bsuite would download them; this project
does not download at run time), and raise a clear error otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gymnasium
import numpy as np

from algorithms.envs.registration import BSUITE_SWEEP_SIZES, bsuite_env_id

_MNIST_DIR = "/tmp/mnist"
_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class BsuiteExperiment:
    """One bsuite id and its sweep entry."""

    bsuite_id: str
    """e.g. 'deep_sea/10'"""
    name: str
    """experiment name, e.g. 'deep_sea'"""
    index: int
    """setting index in the experiment's sweep"""
    kwargs: dict[str, Any]
    """environment constructor arguments, `bsuite.sweep.SETTINGS[bsuite_id]`, e.g. {'size': 30, ...}"""
    num_episodes: int
    """the experiment's episode budget, `NUM_EPISODES` of its sweep"""
    env_id: str
    """gymnasium id, e.g. 'bsuite/deep_sea-10'"""


def parse_bsuite_id(name: str) -> tuple[str, int]:
    """('deep_sea', 10) from 'deep_sea/10' or 'bsuite/deep_sea-10'; clear error for anything else."""
    if name.startswith("bsuite/"):
        experiment, _, index = name[len("bsuite/"):].rpartition("-")
    else:
        experiment, _, index = name.partition("/")
    if experiment not in BSUITE_SWEEP_SIZES or not index.isdigit():
        raise ValueError(
            f"not a bsuite id: {name!r}; use '<experiment>/<index>' or 'bsuite/<experiment>-<index>' with "
            f"experiment one of {sorted(BSUITE_SWEEP_SIZES)}"
        )
    if int(index) >= BSUITE_SWEEP_SIZES[experiment]:
        raise ValueError(
            f"bsuite id {name!r}: index {index} out of range; {experiment} has settings "
            f"0..{BSUITE_SWEEP_SIZES[experiment] - 1}"
        )
    return experiment, int(index)


def bsuite_experiment(name: str) -> BsuiteExperiment:
    """The sweep entry of a bsuite id ('deep_sea/10') or of its gymnasium id ('bsuite/deep_sea-10')."""
    from bsuite import sweep

    experiment, index = parse_bsuite_id(name)
    bsuite_id = f"{experiment}/{index}"
    return BsuiteExperiment(
        bsuite_id=bsuite_id,
        name=experiment,
        index=index,
        kwargs=dict(sweep.SETTINGS[bsuite_id]),
        num_episodes=int(sweep.EPISODES[bsuite_id]),
        env_id=bsuite_env_id(bsuite_id),
    )


def _env_chain(env: Any) -> list[Any]:
    """The bsuite env and the environments it wraps (bsuite's reward wrappers keep theirs in `_env`)."""
    chain = [env]
    while hasattr(chain[-1], "_env"):
        chain.append(chain[-1]._env)
    return chain


class BsuiteEnv(gymnasium.Wrapper):
    """Flattened float32 observations and per-episode scoring info; see the module docstring."""

    def __init__(self, env: gymnasium.Env, raw_env: Any, experiment: BsuiteExperiment):
        super().__init__(env)
        self.experiment = experiment
        self._chain = _env_chain(raw_env)
        self._bsuite_info = next((e.bsuite_info for e in self._chain if hasattr(e, "bsuite_info")), None)
        space = env.observation_space
        self.observation_space = gymnasium.spaces.Box(
            np.asarray(space.low, np.float32).ravel(), np.asarray(space.high, np.float32).ravel(), dtype=np.float32
        )
        self.episodes = 0
        self._return, self._length = 0.0, 0
        self._counters = self._read_counters()

    def _read_counters(self) -> dict[str, float]:
        info = self._bsuite_info() if self._bsuite_info is not None else {}
        return {k: float(v) for k, v in info.items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, _ = self.env.reset(seed=seed, options=options)
        if seed is not None:
            # shimmy reseeds only the outermost env's RandomState; bsuite's noise/scale wrappers hold
            # the task in `_env` with its own RandomState, which must follow the seed too.
            for depth, e in enumerate(self._chain[1:], start=1):
                if isinstance(getattr(e, "_rng", None), np.random.RandomState):
                    e._rng.seed((seed + depth) % 2**32)
        self._return, self._length = 0.0, 0
        return np.asarray(obs, np.float32).ravel(), {}

    def step(self, action: int):
        obs, reward, terminated, truncated, _ = self.env.step(int(action))
        self._return += float(reward)
        self._length += 1
        info: dict[str, Any] = {}
        if terminated or truncated:
            self.episodes += 1
            counters = self._read_counters()
            episode = {
                f"episode_{k.removeprefix('total_')}": counters[k] - self._counters.get(k, 0.0) for k in counters
            }
            self._counters = counters
            info["bsuite"] = {
                "episode": self.episodes,
                "episode_return": self._return,
                "episode_length": self._length,
                **counters,
                **episode,
            }
        return np.asarray(obs, np.float32).ravel(), float(reward), terminated, truncated, info


def make_bsuite_env(bsuite_id: str) -> BsuiteEnv:
    """Gymnasium env for a bsuite id ('deep_sea/10' or 'bsuite/deep_sea-10'), without bsuite's logging."""
    experiment = bsuite_experiment(bsuite_id)
    if experiment.name.startswith("mnist") and not all(
        os.path.isfile(os.path.join(_MNIST_DIR, f)) for f in _MNIST_FILES
    ):
        raise RuntimeError(
            f"bsuite experiment {experiment.name!r} needs the MNIST files {list(_MNIST_FILES)} in {_MNIST_DIR}; "
            "bsuite would download them, which this project does not do at run time"
        )
    import bsuite

    from algorithms.envs._gl import import_with_headless_gl

    # shimmy's package import pulls in dm_control (for its other wrappers).
    BSuiteCompatibilityV0 = import_with_headless_gl("shimmy.bsuite_compatibility").BSuiteCompatibilityV0

    # bsuite.load (not load_from_id, which prints) builds the same env from the sweep's kwargs.
    raw_env = bsuite.load(experiment.name, experiment.kwargs)
    return BsuiteEnv(BSuiteCompatibilityV0(raw_env), raw_env, experiment)
