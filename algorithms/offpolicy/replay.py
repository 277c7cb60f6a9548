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

import math
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

    The per-env pending windows (n·E steps) live on the CPU, where :meth:`add` does its bookkeeping with
    numpy; completed transitions are copied to ``device`` with one copy per dtype. ``state_dict()``
    holds everything, so a restored replay inserts and samples exactly as the original would have.

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

        specs = self._specs = self._field_specs()
        # Fields of one dtype share one tensor (a field is a column range of it), so an insert or a
        # sample costs one indexing op per dtype instead of one per field.
        self._groups, self.storage, self._layout = _packed((capacity,), FIELDS, specs, self.device)
        # The pending windows are small CPU tensors in slot layout [n, E] (env e's newest step sits at
        # slot head[e] - 1 mod n), updated through numpy views: per insert this bookkeeping is a few dozen
        # tiny ops, where numpy's per-op overhead is several times lower than torch's.
        self._pending_groups, self.pending, pending_layout = _packed((n_step, num_envs), ONE_STEP_FIELDS, specs,
                                                                     torch.device("cpu"))
        self.pending_return = torch.zeros(n_step, num_envs, dtype=reward_dtype)
        self.head = torch.zeros(num_envs, dtype=torch.int64)
        self.count = torch.zeros(num_envs, dtype=torch.int64)
        try:
            self._np = {d: g.numpy() for d, g in self._pending_groups.items()}
            self._np_return = self.pending_return.numpy()
        except TypeError as err:  # e.g. bfloat16 has no numpy dtype
            raise ValueError(f"obs, action and reward dtypes need a numpy equivalent: {err}") from err
        # on CPU the storage is written through numpy views too (same memory)
        self._storage_np = {d: g.numpy() for d, g in self._groups.items()} if self.device.type == "cpu" else None
        self._np_head = self.head.numpy()
        self._np_count = self.count.numpy()
        self._np_dtype = {f: torch.empty(0, dtype=d).numpy().dtype for f, (_, d) in specs.items()}
        self._pending_by_dtype = {d: list(fields) for d, fields in pending_layout.items()}
        self._nstep_by_dtype = {d: [f for f in NSTEP_FIELDS if specs[f][1] == d] for d in self._groups}
        self._envs = np.arange(num_envs)
        self._slots = np.arange(n_step)
        self._ages_desc = np.arange(n_step - 1, -1, -1)
        self._one_steps = np.ones(num_envs, dtype=self._ages_desc.dtype)
        self._gamma_pow = np.array([self.gamma**k for k in range(n_step + 1)], dtype=self._np_dtype["reward"])
        self.ptr = 0
        self.size = 0
        self.num_env_steps = 0
        self.num_transitions = 0

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

    def _input(self, name: str, value: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value).astype(self._np_dtype.get(name, np.bool_), copy=False)
        expected = (self.num_envs,) + shape
        if arr.shape != expected:
            raise ValueError(f"{name} has shape {arr.shape}; expected {expected} (E = num_envs first)")
        return arr

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
        """Insert one step of each of the E envs: (s_t, a_t, r_t, s_{t+1}, terminated, truncated), each [E, ...]
        (tensors on any device, numpy arrays or sequences).

        ``next_obs`` must be the true s_{t+1}, i.e. the final observation at an episode's end (not the
        auto-reset one). ``valid`` [E] bool skips envs whose step is not a transition (e.g. the reset step
        of gymnasium's next-step autoreset). Returns the number of transitions this step completed.
        """
        specs = self._specs
        step = {
            name: self._input(name, value, specs[name][0])
            for name, value in zip(ONE_STEP_FIELDS, (obs, action, reward, next_obs, terminated, truncated))
        }
        n, num_envs = self.n_step, self.num_envs
        head, count, ret = self._np_head, self._np_count, self._np_return
        reward_a, term_a = step["reward"], step["terminated"]
        if n == 1 and valid is None:
            return self._add_one_step(step)

        # 1) the new step enters its env's window at slot head[e]
        if valid is None:
            valid_a = None
            envs = self._envs
            slot = head.copy()
            for dtype, group in self._np.items():
                group[slot, envs] = _row(step, self._pending_by_dtype[dtype], num_envs)
            count += 1
        else:
            valid_a = self._input("valid", valid, ())
            envs = np.flatnonzero(valid_a)
            slot = head[envs]
            for dtype, group in self._np.items():
                group[slot, envs] = _row(step, self._pending_by_dtype[dtype], num_envs)[envs]
            count += valid_a
        ret[slot, envs] = 0

        # 2) r_t reaches every pending step of its env: the step of age a gets γ^a r_t
        age = (head[None, :] - self._slots[:, None]) % n  # [n, E]; the new step has age 0
        live = age < count[None, :]
        if valid_a is not None:
            live &= valid_a[None, :]
        ret += np.where(live, self._gamma_pow[age] * reward_a[None, :], 0)

        # 3) complete windows leave: the oldest of a full window, or all of them at an episode's end
        done = term_a | step["truncated"]
        if valid_a is not None:
            done &= valid_a
        # which steps leave, laid out [E, n] by age from the oldest down, so that nonzero() lists them
        # env by env in time order: pending (age < count) and (episode over or age = n - 1)
        ages = self._ages_desc[None, :]
        emit_desc = (ages < count[:, None]) & (done[:, None] | (ages == n - 1))
        if valid_a is not None:
            emit_desc &= valid_a[:, None]
        env_idx, pos_idx = np.nonzero(emit_desc)
        slot_desc = (head[:, None] - ages) % n  # [E, n]: the slot holding the step of each age
        k = len(env_idx)
        if k > 0:
            slot_idx = slot_desc[env_idx, pos_idx]
            steps = self._ages_desc[pos_idx] + 1
            computed = {
                "nstep_return": ret[slot_idx, env_idx],
                "bootstrap_obs": step["next_obs"][env_idx],
                "bootstrap_discount": self._gamma_pow[steps] * ~term_a[env_idx],
                "nstep": steps,
            }
            rows = {}
            for dtype in self._groups:
                parts = [computed[f].reshape(k, -1) for f in self._nstep_by_dtype[dtype]]
                if dtype in self._np:
                    parts.insert(0, self._np[dtype][slot_idx, env_idx])
                rows[dtype] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            self._write(rows, k)

        count -= emit_desc.sum(axis=1)
        if valid_a is None:
            head += 1
        else:
            head += valid_a
        head %= n
        self.num_env_steps += len(envs)
        return k

    def _add_one_step(self, step: dict[str, np.ndarray]) -> int:
        """n = 1, every env valid: each env's step completes at once (R_t = r_t, bootstrap_obs s_{t+1},
        bootstrap_discount γ·(1 − terminated_t), nstep 1). The same arithmetic, writes and window state
        (slot 0 holds the step, count back to 0) as the general path of :meth:`add`, without its masks."""
        num_envs, ret, term_a = self.num_envs, self._np_return, step["terminated"]
        for dtype, group in self._np.items():
            group[0] = _row(step, self._pending_by_dtype[dtype], num_envs)
        ret[0] = 0
        ret[0] += self._gamma_pow[0] * step["reward"]
        computed = {"nstep_return": ret[0].copy(), "bootstrap_obs": step["next_obs"],
                    "bootstrap_discount": self._gamma_pow[1] * ~term_a, "nstep": self._one_steps}
        rows = {}
        for dtype in self._groups:
            parts = [computed[f].reshape(num_envs, -1) for f in self._nstep_by_dtype[dtype]]
            if dtype in self._np:
                parts.insert(0, self._np[dtype][0])
            rows[dtype] = parts[0].copy() if len(parts) == 1 else np.concatenate(parts, axis=1)
        self._write(rows, num_envs)
        self.num_env_steps += num_envs
        return num_envs

    def _write(self, rows: dict[torch.dtype, np.ndarray], k: int) -> None:
        if k > self.capacity:  # only the newest C survive one oversized insert
            rows = {d: v[k - self.capacity :] for d, v in rows.items()}
            self.ptr = (self.ptr + k - self.capacity) % self.capacity
            self.num_transitions += k - self.capacity
            k = self.capacity
        first = min(k, self.capacity - self.ptr)  # contiguous part, then the wrapped rest
        for dtype, group in self._groups.items():
            if self._storage_np is not None:
                target, row = self._storage_np[dtype], rows[dtype]
            else:
                target, row = group, torch.from_numpy(rows[dtype]).to(self.device, dtype, non_blocking=True)
            target[self.ptr : self.ptr + first] = row[:first]
            if first < k:
                target[: k - first] = row[first:]
        self.ptr = (self.ptr + k) % self.capacity
        self.size = min(self.size + k, self.capacity)
        self.num_transitions += k

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """B transitions drawn uniformly with replacement (indices from the replay's seeded generator):
        every field of :data:`FIELDS` as [B, ...] on ``device``, plus ``index`` [B].

        The TD target for a critic V is ``nstep_return + bootstrap_discount * V(bootstrap_obs)``. Fields
        are column views of one gathered tensor per dtype, so multi-element fields (obs, action) may be
        non-contiguous: use ``reshape`` rather than ``view`` on them.
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay: add transitions first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        index = torch.randint(self.size, (batch_size,), generator=self.generator)
        if self.device.type != "cpu":
            index = index.to(self.device)
        batch: dict[str, Tensor] = {}
        for dtype, group in self._groups.items():
            rows = torch.index_select(group, 0, index)  # group[index], without advanced indexing's overhead
            for f, (start, stop, shape) in self._layout[dtype].items():
                if not shape:  # a scalar field: column ``start``, the same view as rows[:, start:stop].view(B)
                    batch[f] = rows[:, start]
                elif len(shape) == 1:
                    batch[f] = rows[:, start:stop]
                else:
                    batch[f] = rows[:, start:stop].view(batch_size, *shape)
        out = {f: batch[f] for f in FIELDS}
        out["index"] = index
        return out

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
            "pending": {f: t.clone() for f, t in self.pending.items()},
            "pending_return": self.pending_return.clone(),
            "head": self.head.clone(),
            "count": self.count.clone(),
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
        # in place: the numpy views used by add() share this memory
        for f, t in self.pending.items():
            t.copy_(state["pending"][f])
        self.pending_return.copy_(state["pending_return"])
        self.head.copy_(state["head"])
        self.count.copy_(state["count"])
        self.ptr = int(state["ptr"])
        self.size = size
        self.num_env_steps = int(state["num_env_steps"])
        self.num_transitions = int(state["num_transitions"])
        self.generator.set_state(state["generator"])


def _packed(
    lead: tuple[int, ...],
    fields: Sequence[str],
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    device: torch.device,
) -> tuple[dict[torch.dtype, Tensor], dict[str, Tensor], dict[torch.dtype, dict[str, tuple]]]:
    """One zero tensor [*lead, W_d] per dtype d holding ``fields`` of that dtype side by side (in order),
    a view [*lead, *shape] of each field into it, and the layout {d: {field: (start, stop, shape)}}."""
    layout: dict[torch.dtype, dict[str, tuple[int, int, tuple[int, ...]]]] = {}
    widths: dict[torch.dtype, int] = {}
    for f in fields:
        shape, dtype = specs[f]
        start = widths.get(dtype, 0)
        widths[dtype] = start + math.prod(shape)
        layout.setdefault(dtype, {})[f] = (start, widths[dtype], shape)
    groups = {d: torch.zeros(lead + (w,), dtype=d, device=device) for d, w in widths.items()}
    views = {
        f: groups[d][..., a:b].view(*lead, *shape) for d, cols in layout.items() for f, (a, b, shape) in cols.items()
    }
    return groups, views, layout


def _row(values: dict[str, np.ndarray], fields: list[str], batch: int) -> np.ndarray:
    """The given fields of one step side by side, [batch, W] (the column layout of :func:`_packed`)."""
    parts = [values[f].reshape(batch, -1) for f in fields]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
