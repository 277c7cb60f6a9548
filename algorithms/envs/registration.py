"""Gymnasium registration of every environment this project ships, by lazy entry-point strings.

Importing this module (or `algorithms.envs`) imports neither dm_control, bsuite, MinAtar nor ale_py: each
id is registered with an `"module:function"` entry point, resolved only when `gymnasium.make` builds the
env. The task lists below are static copies of `dm_control.suite.ALL_TASKS`, of the sizes of
`bsuite.sweep`'s experiments and of ale_py's single-player ROMs (importing those packages costs about 1 s
each); the tests check that the copies equal the installed packages' lists.

Ids:
- `dmc/<domain>-<task>`                 every DeepMind Control Suite task (`algorithms.envs.dmc`)
- `bsuite/<experiment>-<index>`         every bsuite id `<experiment>/<index>` (`algorithms.envs.bsuite`)
- `minatar/<game>`                      the five MinAtar games (`algorithms.envs.minatar`)
- `ale/<Game>`                          every single-player Atari 2600 game of ale-py, e.g. `ale/Pong`,
                                        `ale/SpaceInvaders`, Machado et al. (2018) protocol (`algorithms.envs.ale`)
- `sequence/minatar`, `sequence/ale`, `sequence/tasks`  task sequences for continual RL (`algorithms.envs.sequence`)

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

# ale_py.roms.get_all_rom_ids() (ale-py 0.12), in its order, without the four ROMs that have no single-player
# mode (combat, joust, maze_craze, warlords), as ale_py's own `ALE/<Game>-v5` registration leaves them out.
ALE_GAMES: tuple[str, ...] = (
    "adventure", "air_raid", "alien", "amidar", "assault", "asterix", "asteroids", "atlantis2", "atlantis",
    "backgammon", "bank_heist", "basic_math", "battle_zone", "beam_rider", "berzerk", "blackjack",
    "bowling", "boxing", "breakout", "carnival", "casino", "centipede", "chopper_command", "crazy_climber",
    "crossbow", "darkchambers", "defender", "demon_attack", "donkey_kong", "double_dunk", "earthworld",
    "elevator_action", "enduro", "entombed", "et", "fishing_derby", "flag_capture", "freeway", "frogger",
    "frostbite", "galaxian", "gopher", "gravitar", "hangman", "haunted_house", "hero", "human_cannonball",
    "ice_hockey", "jamesbond", "journey_escape", "kaboom", "kangaroo", "keystone_kapers", "king_kong",
    "klax", "koolaid", "krull", "kung_fu_master", "laser_gates", "lost_luggage", "mario_bros",
    "miniature_golf", "montezuma_revenge", "mr_do", "ms_pacman", "name_this_game", "othello", "pacman",
    "phoenix", "pitfall2", "pitfall", "pong", "pooyan", "private_eye", "qbert", "riverraid", "road_runner",
    "robotank", "seaquest", "sir_lancelot", "skiing", "solaris", "space_invaders", "space_war",
    "star_gunner", "superman", "surround", "tennis", "tetris", "tic_tac_toe_3d", "time_pilot", "trondead",
    "turmoil", "tutankham", "up_n_down", "venture", "video_checkers", "video_chess", "video_cube",
    "video_pinball", "wizard_of_wor", "word_zapper", "yars_revenge", "zaxxon",
)


def dmc_env_id(domain: str, task: str) -> str:
    """`dmc/<domain>-<task>`, e.g. `dmc/cartpole-swingup`."""
    return f"dmc/{domain}-{task}"


def bsuite_env_id(bsuite_id: str) -> str:
    """Gymnasium id of a bsuite id: `deep_sea/10` -> `bsuite/deep_sea-10` (gymnasium forbids a second '/')."""
    experiment, sep, index = bsuite_id.partition("/")
    if not sep or not index.isdigit():
        raise ValueError(f"bsuite_id must look like '<experiment>/<index>', e.g. 'deep_sea/10'; got {bsuite_id!r}")
    return f"bsuite/{experiment}-{index}"


def ale_env_id(game: str) -> str:
    """`ale/<Game>` of an ale_py ROM id, PascalCase as in ale_py's own ids: `space_invaders` -> `ale/SpaceInvaders`."""
    return "ale/" + game.title().replace("_", "")


def all_ale_env_ids() -> list[str]:
    return [ale_env_id(g) for g in ALE_GAMES]


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
    for game in ALE_GAMES:
        _register(ale_env_id(game), "algorithms.envs.ale:make_ale_env", {"game": game})
    _register("sequence/minatar", "algorithms.envs.sequence:make_minatar_sequence", {})
    _register("sequence/ale", "algorithms.envs.sequence:make_ale_sequence", {})
    _register("sequence/tasks", "algorithms.envs.sequence:TaskSequenceEnv", {})
