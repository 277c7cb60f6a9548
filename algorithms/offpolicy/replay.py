"""A replay of preallocated tensors with n-step returns computed on insert, for E parallel environments.

Shape letters: C capacity (transitions), E parallel envs, B batch, n the n-step horizon.

Each call to :meth:`TensorReplay.add` inserts one env step for each of the E envs (a vectorised env
step). Every env has its own pending window of at most n steps; a step leaves the window and is written
to the ring buffer as a transition once its n-step target is known:
- the window holds n steps: the oldest leaves with n' = n;
- the env's episode ends (terminated or truncated): every pending step leaves, shortened to the end.

For a step t of an episode that ends at T (s_T the last observation), with n'_t = min(n, T − t) at the
end of the episode and n otherwise, the stored n-step fields are (Sutton & Barto 2018, §7.1)

    nstep_return        R_t = Σ_{k<n'} γ^k r_{t+k}
    bootstrap_obs       s_{t+n'}
    bootstrap_discount  γ^{n'} · (1 − terminated_{t+n'−1})
    nstep               n'

so the TD target is R_t + bootstrap_discount · V(bootstrap_obs). Truncation is not termination: at a
time limit the window bootstraps from the observation at truncation (discount γ^{n'}); at a terminal
step the discount is 0. A step with both flags set counts as terminated. The one-step fields (obs,
action, reward, next_obs, terminated, truncated) are stored too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

ONE_STEP_FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")
NSTEP_FIELDS = ("nstep_return", "bootstrap_obs", "bootstrap_discount", "nstep")
FIELDS = ONE_STEP_FIELDS + NSTEP_FIELDS

ArrayLike = Tensor | np.ndarray | Sequence[Any]


class TensorReplay:
    """Ring buffer of C transitions in preallocated tensors on ``device``; uniform sampling from a seeded
    CPU ``torch.Generator`` (the same seed gives the same indices on every device).

    Args:
        capacity: C, the number of transitions kept (the oldest are overwritten).
        num_envs: E, the number of envs inserting one step each per :meth:`add`.
        obs_shape: shape of one observation.
        action_shape: shape of one action (``()`` for a discrete action).
        n_step: n >= 1, the n-step horizon.
        gamma: discount γ in [0, 1].
        obs_dtype, action_dtype, reward_dtype: storage dtypes (e.g. uint8 frames, int64 discrete actions).
        device: where the storage lives; :meth:`sample` returns tensors there.
        seed: seeds the sampling generator.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_shape: Sequence[int],
        action_shape: Sequence[int] = (),
        *,
        n_step: int = 1,
        gamma: float = 0.99,
        obs_dtype: torch.dtype = torch.float32,
        action_dtype: torch.dtype = torch.float32,
        reward_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        for name, value in (("capacity", capacity), ("num_envs", num_envs), ("n_step", n_step)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if not reward_dtype.is_floating_point:
            raise ValueError(f"reward_dtype must be a floating dtype, got {reward_dtype}")
        self.capacity = capacity
        self.num_envs = num_envs
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.action_shape = tuple(int(d) for d in action_shape)
        self.n_step = n_step
        self.gamma = float(gamma)
        self.obs_dtype = obs_dtype
        self.action_dtype = action_dtype
        self.reward_dtype = reward_dtype
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

        def buf(lead: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.zeros(lead + shape, dtype=dtype, device=self.device)

        shapes = self._field_specs()
        self.storage = {f: buf((capacity,), s, d) for f, (s, d) in shapes.items()}
        # pending windows in slot layout [n, E]: env e's newest step sits at slot head[e] - 1 (mod n)
        self.pending = {f: buf((n_step, num_envs), shapes[f][0], shapes[f][1]) for f in ONE_STEP_FIELDS}
        self.pending["nstep_return"] = buf((n_step, num_envs), (), reward_dtype)
        self.head = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.count = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.ptr = 0
        self.size = 0
        self.num_env_steps = 0
        self.num_transitions = 0
        self._envs = torch.arange(num_envs, device=self.device)
        self._slots = torch.arange(n_step, device=self.device)
        self._gamma_pow = torch.tensor([self.gamma**k for k in range(n_step + 1)], dtype=reward_dtype,
                                       device=self.device)

    def _field_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            "obs": (self.obs_shape, self.obs_dtype),
            "action": (self.action_shape, self.action_dtype),
            "reward": ((), self.reward_dtype),
            "next_obs": (self.obs_shape, self.obs_dtype),
            "terminated": ((), torch.bool),
            "truncated": ((), torch.bool),
            "nstep_return": ((), self.reward_dtype),
            "bootstrap_obs": (self.obs_shape, self.obs_dtype),
            "bootstrap_discount": ((), self.reward_dtype),
            "nstep": ((), torch.int64),
        }

    def __len__(self) -> int:
        return self.size

    def _input(self, name: str, value: ArrayLike, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        tensor = torch.as_tensor(value, device=self.device).to(dtype)
        expected = (self.num_envs,) + shape
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {expected} (E = num_envs first)")
        return tensor

    def add(
        self,
        obs: ArrayLike,
        action: ArrayLike,
        reward: ArrayLike,
        next_obs: ArrayLike,
        terminated: ArrayLike,
        truncated: ArrayLike,
        valid: ArrayLike | None = None,
    ) -> int:
        """Insert one step of each of the E envs: (s_t, a_t, r_t, s_{t+1}, terminated, truncated), each [E, ...].

        ``next_obs`` must be the true s_{t+1}, i.e. the final observation at an episode's end (not the
        auto-reset one). ``valid`` [E] bool skips envs whose step is not a transition (e.g. the reset step
        of gymnasium's next-step autoreset). Returns the number of transitions written to the buffer.
        """
        specs = self._field_specs()
        obs_t = self._input("obs", obs, *specs["obs"])
        action_t = self._input("action", action, *specs["action"])
        reward_t = self._input("reward", reward, *specs["reward"])
        next_obs_t = self._input("next_obs", next_obs, *specs["next_obs"])
        term_t = self._input("terminated", terminated, (), torch.bool)
        trunc_t = self._input("truncated", truncated, (), torch.bool)
        if valid is None:
            valid_t = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
            envs = self._envs
        else:
            valid_t = self._input("valid", valid, (), torch.bool)
            envs = valid_t.nonzero().squeeze(1)
        n = self.n_step
        pend = self.pending

        # 1) the new step enters its env's window at slot head[e]
        slot = self.head[envs]
        for name, value in (("obs", obs_t), ("action", action_t), ("reward", reward_t), ("next_obs", next_obs_t),
                            ("terminated", term_t), ("truncated", trunc_t)):
            pend[name][slot, envs] = value[envs]
        pend["nstep_return"][slot, envs] = 0
        self.count += valid_t.long()

        # 2) r_t reaches every pending step of its env: the step of age a gets γ^a r_t
        age = (self.head[None, :] - self._slots[:, None]) % n  # [n, E]; the new step has age 0
        live = (age < self.count[None, :]) & valid_t[None, :]
        pend["nstep_return"] += torch.where(live, self._gamma_pow[age] * reward_t[None, :], 0)

        # 3) complete windows leave: the oldest of a full window, or all of them at an episode's end
        done = (term_t | trunc_t) & valid_t
        emit = live & (done[None, :] | (age == n - 1))
        env_idx, slot_idx = emit.T.nonzero(as_tuple=True)
        ages = age[slot_idx, env_idx]
        # chronological order within each env (oldest first), envs in index order
        order = torch.argsort(env_idx * n + (n - 1 - ages), stable=True)
        env_idx, slot_idx, ages = env_idx[order], slot_idx[order], ages[order]
        steps = ages + 1
        out = {f: pend[f][slot_idx, env_idx] for f in ONE_STEP_FIELDS + ("nstep_return",)}
        out["bootstrap_obs"] = next_obs_t[env_idx]
        out["bootstrap_discount"] = self._gamma_pow[steps] * (~term_t[env_idx]).to(self.reward_dtype)
        out["nstep"] = steps
        written = self._write(out, int(env_idx.numel()))

        self.count -= emit.sum(dim=0)
        self.head = torch.where(valid_t, (self.head + 1) % n, self.head)
        self.num_env_steps += int(envs.numel())
        return written

    def _write(self, values: dict[str, Tensor], k: int) -> int:
        if k == 0:
            return 0
        if k > self.capacity:  # only the newest C survive one oversized insert
            values = {f: v[k - self.capacity :] for f, v in values.items()}
            self.ptr = (self.ptr + k - self.capacity) % self.capacity
            self.num_transitions += k - self.capacity
            k = self.capacity
        pos = (self.ptr + torch.arange(k, device=self.device)) % self.capacity
        for f, v in values.items():
            self.storage[f][pos] = v
        self.ptr = (self.ptr + k) % self.capacity
        self.size = min(self.size + k, self.capacity)
        self.num_transitions += k
        return k

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """B transitions drawn uniformly with replacement: every field as [B, ...] plus ``index`` [B]."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay: add transitions first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        index = torch.randint(self.size, (batch_size,), generator=self.generator).to(self.device)
        batch = {f: t[index] for f, t in self.storage.items()}
        batch["index"] = index
        return batch

    def stored(self) -> dict[str, Tensor]:
        """Views of the filled part of the storage [size, ...] in slot order (oldest first until it wraps)."""
        return {f: t[: self.size] for f, t in self.storage.items()}

    def config(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "obs_shape": list(self.obs_shape),
            "action_shape": list(self.action_shape),
            "n_step": self.n_step,
            "gamma": self.gamma,
            "obs_dtype": str(self.obs_dtype),
            "action_dtype": str(self.action_dtype),
            "reward_dtype": str(self.reward_dtype),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: filled storage, pending windows, counters and
        the generator state, as CPU copies (plain tensors and numbers, for ``torch.save``)."""
        return {
            "config": self.config(),
            "storage": {f: t[: self.size].to("cpu", copy=True) for f, t in self.storage.items()},
            "pending": {f: t.to("cpu", copy=True) for f, t in self.pending.items()},
            "head": self.head.to("cpu", copy=True),
            "count": self.count.to("cpu", copy=True),
            "ptr": self.ptr,
            "size": self.size,
            "num_env_steps": self.num_env_steps,
            "num_transitions": self.num_transitions,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.config()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(f"replay state has {key}={value!r}; this replay has {key}={mine.get(key)!r}")
        size = int(state["size"])
        for f, t in self.storage.items():
            t[:size] = state["storage"][f].to(self.device)
        for f, t in self.pending.items():
            t.copy_(state["pending"][f])
        self.head.copy_(state["head"])
        self.count.copy_(state["count"])
        self.ptr = int(state["ptr"])
        self.size = size
        self.num_env_steps = int(state["num_env_steps"])
        self.num_transitions = int(state["num_transitions"])
        self.generator.set_state(state["generator"])
