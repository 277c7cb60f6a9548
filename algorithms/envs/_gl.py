"""Headless OpenGL backend choice for MuJoCo-based packages (dm_control, and shimmy which imports it).

Without a display dm_control's automatic choice is GLFW, which warns in every process and cannot create
a context; tasks that upload a heightfield at reset (quadruped-escape) then fail. dm_control fixes its
backend when first imported (RLlib imports it on `import ray.rllib`), so `select_headless_mujoco_gl`
runs on `import algorithms.envs` (cheap: sets an environment variable) and picks, when neither
MUJOCO_GL nor DISPLAY is set and dm_control is not imported yet, EGL where libEGL is present and
rendering off ("disable") otherwise. If EGL then cannot initialise (dm_control initialises the EGL
display at import), `import_with_headless_gl` falls back to "disable". A user's MUJOCO_GL is kept.
"""

from __future__ import annotations

import ctypes.util
import importlib
import os
import sys
from types import ModuleType

_chosen: str | None = None
"""the MUJOCO_GL value this module set, if any"""


def select_headless_mujoco_gl() -> str | None:
    """Sets MUJOCO_GL for a headless process (see the module docstring); returns the value set or None."""
    global _chosen
    if "MUJOCO_GL" in os.environ or "DISPLAY" in os.environ or "dm_control" in sys.modules:
        return None
    egl_ok = ctypes.util.find_library("EGL") and os.environ.get("PYOPENGL_PLATFORM", "egl") == "egl"
    _chosen = os.environ["MUJOCO_GL"] = "egl" if egl_ok else "disable"
    return _chosen


def import_with_headless_gl(module: str) -> ModuleType:
    """Imports `module`; if the EGL backend we chose fails to initialise, retries with rendering off."""
    select_headless_mujoco_gl()
    try:
        return importlib.import_module(module)
    except ImportError:
        if _chosen != "egl" or os.environ.get("MUJOCO_GL") != "egl":
            raise
        os.environ["MUJOCO_GL"] = "disable"
        return importlib.import_module(module)
