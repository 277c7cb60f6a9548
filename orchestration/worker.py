"""Ray worker-process setup hook: import the spec's modules in every worker of the job.

Set through ``runtime_env={"worker_process_setup_hook": "orchestration.worker.setup"}`` with the
module list in ``ORCHESTRA_IMPORTS`` (comma-separated), so user envs, algorithms and tasks registered
at import time exist in env runners and trial actors too.
"""

from __future__ import annotations

import importlib
import os


def setup() -> None:
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    for mod in filter(None, os.environ.get("ORCHESTRA_IMPORTS", "").split(",")):
        importlib.import_module(mod)
