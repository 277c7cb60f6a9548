"""Functional inner optimisers: pure functions of (params, grads, state) -> (params', state').

Parameters, gradients and state are flat tuples of tensors so that every piece of differentiable
state can be passed explicitly through custom autograd Functions (MixFlow-MG's "pass all
differentiable state as explicit arguments"). Nothing is updated in place, so autograd can
differentiate the update with respect to both the parameters and the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

Params = tuple[Tensor, ...]
State = tuple[Tensor, ...]


class InnerOptimizer(Protocol):
    """An (init, update) pair in the style of Optax; both are pure."""

    def init(self, params: Params) -> State: ...

    def update(self, params: Params, grads: Params, state: State) -> tuple[Params, State]: ...


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent:  θ' = θ − α g.  State: empty."""

    lr: float

    def init(self, params: Params) -> State:
        return ()

    def update(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        return tuple(p - self.lr * g for p, g in zip(params, grads, strict=True)), ()


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba 2015, Alg. 1) with Optax's ``eps_root``.

        t' = t + 1
        m' = β1 m + (1 − β1) g,          v' = β2 v + (1 − β2) g²
        m̂ = m' / (1 − β1^t'),            v̂ = v' / (1 − β2^t')
        θ' = θ − α m̂ / (sqrt(v̂ + ε_root) + ε)

    ``eps_root`` > 0 keeps the derivative of sqrt finite where v̂ = 0 (e.g. embedding rows absent
    from a batch have g = 0 exactly; d sqrt(v)/dv = ∞ there would turn 0·∞ into NaN in the
    meta-gradient). It is added inside the square root, as in ``optax.scale_by_adam(eps_root=...)``.

    State layout (flat): ``(t, m_1..m_n, v_1..v_n)`` with ``t`` a 0-dim float tensor.
    """

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 1e-16

    def init(self, params: Params) -> State:
        t = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
        m = tuple(torch.zeros_like(p) for p in params)
        v = tuple(torch.zeros_like(p) for p in params)
        return (t, *m, *v)

    def update(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        n = len(params)
        if len(state) != 1 + 2 * n:
            raise ValueError(f"Adam state has {len(state)} tensors, expected {1 + 2 * n}")
        t = state[0].detach() + 1
        m_old, v_old = state[1 : 1 + n], state[1 + n :]
        bc1 = 1 - self.b1**t
        bc2 = 1 - self.b2**t
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(params, grads, m_old, v_old, strict=True):
            m = self.b1 * m + (1 - self.b1) * g
            v = self.b2 * v + (1 - self.b2) * g * g
            new_p.append(p - self.lr * (m / bc1) / (torch.sqrt(v / bc2 + self.eps_root) + self.eps))
            new_m.append(m)
            new_v.append(v)
        return tuple(new_p), (t, *new_m, *new_v)


def make_inner_optimizer(name: str, lr: float, **kwargs: float) -> InnerOptimizer:
    """Build an inner optimiser by name (``sgd`` or ``adam``)."""
    if name == "sgd":
        return SGD(lr=lr)
    if name == "adam":
        return Adam(lr=lr, **kwargs)
    raise ValueError(f"inner optimizer name={name!r}: allowed values are 'sgd', 'adam'")
