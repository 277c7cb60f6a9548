"""Process environment for local Ray: loopback only, no usage-stats lookups, one torch thread per CPU."""

from __future__ import annotations

import os

LOCAL_RAY_ENV = {
    # A plain ray.init() binds the machine's external address; this and _node_ip_address keep
    # every Ray port on 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray looks its usage-stats host up even when stats are off; point it at a closed local port.
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    # Tune would otherwise add its own CSV/JSON/TensorBoard loggers to every trial.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def set_local_ray_env() -> None:
    """Loopback Ray settings, and a headless MuJoCo GL backend chosen before anything imports
    dm_control (RLlib does on import); Ray workers inherit both from this process."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    from algorithms.envs._gl import select_headless_mujoco_gl

    select_headless_mujoco_gl()


def set_torch_threads(num_cpus: float | int | None) -> int:
    """Give torch as many intra-op threads as CPUs this process was given (at least 1).

    Oversubscribed threads made one update step ~40x slower on a 2-core machine.
    """
    import torch

    n = max(1, int(num_cpus or 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
