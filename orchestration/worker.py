"""Ray worker-process setup hook: import the spec's modules in every worker of the job.

Set through ``runtime_env={"worker_process_setup_hook": "orchestration.worker.setup"}`` with the
module list in ``ORCHESTRA_IMPORTS`` (comma-separated), so user envs, algorithms and tasks registered
at import time exist in env runners and trial actors too.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys


class _StderrAtEmit:
    """``sys.stderr`` as it is when a log record is written, not when its handler was made."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def log_handlers_follow_stderr() -> None:
    """Log handlers created without a stream (RLlib makes one when it is imported, before Tune starts a
    trial) write to the current ``sys.stderr``, like Ray's own handler: Tune's ``log_to_file`` swaps it for a
    tee into the trial's ``stderr`` file, so library warnings of a trial land there."""
    cls = logging.StreamHandler
    if getattr(cls, "_orchestra_follows_stderr", False):
        return
    init = cls.__init__

    def __init__(self, stream=None):  # noqa: N807 - replaces StreamHandler.__init__
        init(self, _StderrAtEmit() if stream is None else stream)

    cls.__init__ = __init__
    cls._orchestra_follows_stderr = True


def setup() -> None:
    from orchestration.spec import import_builtin_envs

    log_handlers_follow_stderr()
    import_builtin_envs()
    for mod in filter(None, os.environ.get("ORCHESTRA_IMPORTS", "").split(",")):
        importlib.import_module(mod)
