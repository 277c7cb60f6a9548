"""A fixed probe set of observations per trial, shared by the plasticity and convergence diagnostics.

The probe set is collected once per trial and then kept for the whole trial (checkpoints included),
so metrics at different iterations are computed on the same inputs.

- :class:`ProbeSet`: ``.obs`` (a float tensor [N, ...]), ``save(path)`` / ``ProbeSet.load(path)``
  (a NumPy ``.npz`` file, no pickle), ``state_dict()`` / ``from_state_dict()`` for checkpoints.
- :func:`collect_env_probe`: steps a gymnasium env with uniformly random actions from a seeded
  action space (env reset with the same seed; episodes restart until N observations are collected).
- RLlib (any Algorithm of the new API stack): :func:`probe_set_for_algorithm` collects the probe
  from a fresh copy of the algorithm's env (built the way RLlib's EnvRunner builds it) on the driver
  and attaches it to the Algorithm. :func:`install_probe_persistence` makes the Algorithm's own
  ``get_state`` / ``set_state`` carry it under the key :data:`PROBE_STATE_KEY`, so it is written into
  ``algorithm_state.pkl`` by ``algo.save()`` / ``save_to_path`` (and Tune checkpoints) and comes back
  with ``Algorithm.from_checkpoint``, ``algo.restore`` and Tune's trial restore. Diagnostics call
  :func:`install_probe_persistence` in ``on_algorithm_init`` (before any restore happens) and
  :func:`probe_set_for_algorithm` when they need the probe; every diagnostic of a trial gets the same
  probe set (the first request decides the seed; a request for more observations than held
  re-collects with the same seed, which extends the old set when the env is deterministic).

Probe observations are the env's raw observations: env-to-module connectors (e.g. observation
filters, frame stacking) are not applied. Single-agent envs only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Key of the probe set in the Algorithm's state dict (``algorithm_state.pkl``).
PROBE_STATE_KEY = "diagnostics_probe_set"
_ATTR = "_diagnostics_probe_set"
_INSTALLED = "_diagnostics_probe_persistence"


@dataclass
class ProbeSet:
    """A fixed batch of observations. ``obs``: float32 tensor [N, ...] on CPU."""

    obs: torch.Tensor
    seed: int = 0
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.obs, torch.Tensor):
            self.obs = torch.as_tensor(np.asarray(self.obs))
        if self.obs.dim() < 1 or self.obs.shape[0] == 0:
            raise ValueError(f"a probe set needs at least one observation, got shape {tuple(self.obs.shape)}")

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def head(self, n: int) -> ProbeSet:
        """The first ``n`` observations (all of them if fewer are held)."""
        return ProbeSet(self.obs[:n], self.seed, self.source, dict(self.meta))

    def state_dict(self) -> dict[str, Any]:
        """Plain NumPy / Python values (safe for pickle and msgpack checkpoints)."""
        return {"obs": self.obs.cpu().numpy(), "seed": int(self.seed), "source": str(self.source)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ProbeSet:
        return cls(torch.as_tensor(np.asarray(state["obs"])), int(state["seed"]), str(state["source"]))

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz``, arrays only: loading needs no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, obs=self.obs.cpu().numpy(), seed=np.int64(self.seed), source=np.str_(self.source))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeSet:
        with np.load(Path(path), allow_pickle=False) as d:
            return cls(torch.as_tensor(d["obs"]), int(d["seed"]), str(d["source"]))


def collect_env_probe(env: Any, size: int, seed: int, source: str = "") -> ProbeSet:
    """Collect ``size`` observations from a gymnasium env under uniformly random actions.

    The first reset uses ``seed``; actions come from ``env.action_space`` seeded with ``seed``; later
    resets continue the env's own seeded RNG, so the same env and seed give the same probe set, and a
    longer collection extends a shorter one.
    """
    if size < 1:
        raise ValueError(f"probe_size must be >= 1, got {size}")
    space = env.action_space
    space.seed(seed)
    obs, _ = env.reset(seed=seed)
    rows = [np.asarray(obs)]
    while len(rows) < size:
        obs, _, terminated, truncated, _ = env.step(space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
        rows.append(np.asarray(obs))
    if isinstance(rows[0], np.ndarray) and rows[0].dtype == object:
        raise TypeError("probe sets need array observations (Dict/Tuple observation spaces are not supported)")
    arr = np.stack(rows).astype(np.float32)
    return ProbeSet(torch.from_numpy(arr), seed, source)


def make_env_from_algorithm_config(config: Any) -> Any:
    """A single (non-vectorised) gymnasium env built like RLlib's SingleAgentEnvRunner builds it:
    a name registered with ``ray.tune.register_env``, a callable/class taking the env config, or a
    gymnasium id."""
    import gymnasium as gym
    from ray.rllib.env.env_context import EnvContext

    from algorithms.ray_compat import registered_env_creator

    env_spec = config.env
    if not env_spec:
        raise ValueError("config.env is not set: cannot collect a probe set from the env")
    ctx = EnvContext(dict(config.env_config or {}), worker_index=0, num_workers=0)
    creator = registered_env_creator(env_spec) if isinstance(env_spec, str) else None
    if creator is not None:
        return creator(ctx)
    if callable(env_spec):
        return env_spec(ctx)
    return gym.make(env_spec, **dict(config.env_config or {}))


def install_probe_persistence(algorithm: Any) -> None:
    """Make ``algorithm.get_state`` / ``set_state`` carry the probe set (idempotent).

    Wraps the two methods on this Algorithm *instance*: ``get_state`` adds :data:`PROBE_STATE_KEY`
    when the full state (or that component) is asked for; ``set_state`` restores the probe set from it.
    Must run before a restore (diagnostics call it in ``on_algorithm_init``).
    """
    if getattr(algorithm, _INSTALLED, False):
        return
    orig_get, orig_set = algorithm.get_state, algorithm.set_state

    def get_state(components=None, *, not_components=None, **kwargs):
        state = orig_get(components, not_components=not_components, **kwargs)
        probe = getattr(algorithm, _ATTR, None)
        wanted = components is None or PROBE_STATE_KEY in _as_list(components)
        excluded = PROBE_STATE_KEY in _as_list(not_components)
        if probe is not None and wanted and not excluded:
            state[PROBE_STATE_KEY] = probe.state_dict()
        return state

    def set_state(state, *args, **kwargs):
        if PROBE_STATE_KEY in state:
            state = dict(state)
            setattr(algorithm, _ATTR, ProbeSet.from_state_dict(state.pop(PROBE_STATE_KEY)))
        return orig_set(state, *args, **kwargs)

    algorithm.get_state = get_state
    algorithm.set_state = set_state
    setattr(algorithm, _INSTALLED, True)


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def probe_set_for_algorithm(algorithm: Any, size: int, seed: int | None = None) -> ProbeSet:
    """The trial's probe set of an RLlib Algorithm, collected on first use (see module docstring).

    ``seed`` defaults to the algorithm config's seed (0 when unset). Returns the held probe set's
    first ``size`` observations.
    """
    install_probe_persistence(algorithm)
    probe: ProbeSet | None = getattr(algorithm, _ATTR, None)
    if probe is not None and len(probe) >= size:
        return probe.head(size)
    if probe is not None:
        seed = probe.seed
    elif seed is None:
        seed = int(algorithm.config.seed) if algorithm.config.seed is not None else 0
    env = make_env_from_algorithm_config(algorithm.config)
    try:
        probe = collect_env_probe(env, size, seed, source=f"env:{algorithm.config.env}")
    finally:
        env.close()
    setattr(algorithm, _ATTR, probe)
    return probe


def attached_probe_set(algorithm: Any) -> ProbeSet | None:
    """The probe set attached to ``algorithm`` (None before it is collected or restored)."""
    return getattr(algorithm, _ATTR, None)
