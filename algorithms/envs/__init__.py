"""Gymnasium environments: DeepMind Control Suite, bsuite, MinAtar, the Arcade Learning Environment and task
sequences for continual RL.

Importing this package registers every id (see `algorithms.envs.registration`) with lazy entry-point
strings, so it is cheap enough to import in every Ray worker; the simulators load on `gymnasium.make`.
It also picks a headless OpenGL backend for dm_control when none is set (see `algorithms.envs._gl`).
"""

from algorithms.envs._gl import select_headless_mujoco_gl
from algorithms.envs.registration import (
    ale_env_id,
    all_ale_env_ids,
    all_bsuite_ids,
    all_dmc_env_ids,
    all_minatar_env_ids,
    bsuite_env_id,
    dmc_env_id,
    register_all,
)

select_headless_mujoco_gl()
register_all()

__all__ = [
    "ale_env_id",
    "all_ale_env_ids",
    "all_bsuite_ids",
    "all_dmc_env_ids",
    "all_minatar_env_ids",
    "bsuite_env_id",
    "dmc_env_id",
    "register_all",
]
