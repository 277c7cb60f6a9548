"""Gymnasium registration of every environment this project ships, by lazy entry-point strings.

Importing this module (or `algorithms.envs`) imports neither dm_control, bsuite nor MinAtar: each id is
registered with an `"module:function"` entry point, resolved only when `gymnasium.make` builds the env.
The task lists below are static copies of `dm_control.suite.ALL_TASKS` and of the sizes of
`bsuite.sweep`'s experiments (importing those packages costs about 1 s each); the tests check that the
copies equal the installed packages' lists.

Ids:
- `dmc/<domain>-<task>`                 every DeepMind Control Suite task (`algorithms.envs.dmc`)
- `bsuite/<experiment>-<index>`         every bsuite id `<experiment>/<index>` (`algorithms.envs.bsuite`)
- `minatar/<game>`                      the five MinAtar games (`algorithms.envs.minatar`)
- `sequence/minatar`, `sequence/tasks`  task sequences for continual RL (`algorithms.envs.sequence`)

RLlib: `config.environment("dmc/cartpole-swingup", env_config={...})` works in any process that has
imported `algorithms.envs` (RLlib calls `gymnasium.make(env, **env_config)`). Where that import is not
guaranteed, `"algorithms.envs:dmc/cartpole-swingup"` makes gymnasium import this package first.
"""

from __future__ import annotations

import gymnasium

# dm_control.suite.ALL_TASKS (dm_control 1.0.50), in the suite's order.
DMC_TASKS: tuple[tuple[str, str], ...] = (
    ("acrobot", "swingup"), ("acrobot", "swingup_sparse"), ("ball_in_cup", "catch"),
    ("cartpole", "balance"), ("cartpole", "balance_sparse"), ("cartpole", "swingup"),
    ("cartpole", "swingup_sparse"), ("cartpole", "two_poles"), ("cartpole", "three_poles"),
    ("cheetah", "run"), ("dog", "stand"), ("dog", "walk"), ("dog", "trot"), ("dog", "run"),
    ("dog", "fetch"), ("finger", "spin"), ("finger", "turn_easy"), ("finger", "turn_hard"),
    ("fish", "upright"), ("fish", "swim"), ("hopper", "stand"), ("hopper", "hop"),
    ("humanoid", "stand"), ("humanoid", "walk"), ("humanoid", "run"), ("humanoid", "run_pure_state"),
    ("humanoid_CMU", "stand"), ("humanoid_CMU", "walk"), ("humanoid_CMU", "run"),
    ("lqr", "lqr_2_1"), ("lqr", "lqr_6_2"), ("manipulator", "bring_ball"), ("manipulator", "bring_peg"),
    ("manipulator", "insert_ball"), ("manipulator", "insert_peg"), ("pendulum", "swingup"),
    ("point_mass", "easy"), ("point_mass", "hard"), ("quadruped", "walk"), ("quadruped", "run"),
    ("quadruped", "escape"), ("quadruped", "fetch"), ("reacher", "easy"), ("reacher", "hard"),
    ("stacker", "stack_2"), ("stacker", "stack_4"), ("swimmer", "swimmer6"), ("swimmer", "swimmer15"),
    ("walker", "stand"), ("walker", "walk"), ("walker", "run"),
)

# Number of settings in each bsuite experiment's sweep (bsuite 0.3.6): ids are `<experiment>/0..n-1`.
BSUITE_SWEEP_SIZES: dict[str, int] = {
    "bandit": 20, "bandit_noise": 20, "bandit_scale": 20, "cartpole": 20, "cartpole_noise": 20,
    "cartpole_scale": 20, "cartpole_swingup": 20, "catch": 20, "catch_noise": 20, "catch_scale": 20,
    "deep_sea": 21, "deep_sea_stochastic": 21, "discounting_chain": 20, "memory_len": 23,
    "memory_size": 17, "mnist": 20, "mnist_noise": 20, "mnist_scale": 20, "mountain_car": 20,
    "mountain_car_noise": 20, "mountain_car_scale": 20, "umbrella_distract": 23, "umbrella_length": 23,
}

MINATAR_GAMES: tuple[str, ...] = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")


def dmc_env_id(domain: str, task: str) -> str:
    """`dmc/<domain>-<task>`, e.g. `dmc/cartpole-swingup`."""
    return f"dmc/{domain}-{task}"


def bsuite_env_id(bsuite_id: str) -> str:
    """Gymnasium id of a bsuite id: `deep_sea/10` -> `bsuite/deep_sea-10` (gymnasium forbids a second '/')."""
    experiment, sep, index = bsuite_id.partition("/")
    if not sep or not index.isdigit():
        raise ValueError(f"bsuite_id must look like '<experiment>/<index>', e.g. 'deep_sea/10'; got {bsuite_id!r}")
    return f"bsuite/{experiment}-{index}"


def all_dmc_env_ids() -> list[str]:
    return [dmc_env_id(d, t) for d, t in DMC_TASKS]


def all_bsuite_ids() -> list[str]:
    return [f"{name}/{i}" for name, n in BSUITE_SWEEP_SIZES.items() for i in range(n)]


def all_minatar_env_ids() -> list[str]:
    return [f"minatar/{game}" for game in MINATAR_GAMES]


def _register(env_id: str, entry_point: str, kwargs: dict) -> None:
    # Idempotent: a second call (e.g. importlib.reload) must not spam gymnasium's override warning.
    if env_id not in gymnasium.registry:
        gymnasium.register(id=env_id, entry_point=entry_point, kwargs=kwargs)


def register_all() -> None:
    """Registers every id listed in the module docstring. Cheap (strings only) and idempotent."""
    for domain, task in DMC_TASKS:
        _register(dmc_env_id(domain, task), "algorithms.envs.dmc:DMCEnv", {"domain": domain, "task": task})
    for bsuite_id in all_bsuite_ids():
        _register(bsuite_env_id(bsuite_id), "algorithms.envs.bsuite:make_bsuite_env", {"bsuite_id": bsuite_id})
    for game in MINATAR_GAMES:
        _register(f"minatar/{game}", "algorithms.envs.minatar:MinAtarEnv", {"game": game})
    _register("sequence/minatar", "algorithms.envs.sequence:make_minatar_sequence", {})
    _register("sequence/tasks", "algorithms.envs.sequence:TaskSequenceEnv", {})
