"""Import MuJoCo-based packages (dm_control, shimmy) with a headless OpenGL backend chosen.

Without a display dm_control's automatic choice is GLFW, which warns in every process and cannot create
a context; tasks that upload a heightfield at reset (quadruped-escape) then fail. So when neither
MUJOCO_GL nor DISPLAY is set we pick EGL where libEGL is present, and rendering off ("disable")
otherwise or when EGL cannot initialise (dm_control initialises the EGL display at import). A user's
own MUJOCO_GL is always kept.
"""

from __future__ import annotations

import ctypes.util
import importlib
import os
from types import ModuleType


def import_with_headless_gl(module: str) -> ModuleType:
    chosen = None
    if "MUJOCO_GL" not in os.environ and "DISPLAY" not in os.environ:
        egl_ok = ctypes.util.find_library("EGL") and os.environ.get("PYOPENGL_PLATFORM", "egl") == "egl"
        chosen = os.environ["MUJOCO_GL"] = "egl" if egl_ok else "disable"
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError):
        if chosen != "egl":
            raise
        os.environ["MUJOCO_GL"] = "disable"
        return importlib.import_module(module)
