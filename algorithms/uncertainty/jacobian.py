"""Per-example Jacobians of a quantity of interest with respect to all parameters (torch.func).

Shape letters: B inputs, K outputs per input (K = 1 for a scalar quantity), P parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from algorithms.uncertainty.params import Params, QueryFn


def as_inputs(inputs: Tensor | Sequence[Tensor]) -> tuple[tuple[Tensor, ...], int]:
    """Normalise ``inputs`` (a tensor or a tuple of tensors sharing the leading dim B) to (tuple, B)."""
    items = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise TypeError("inputs must be a Tensor [B, ...] or a non-empty tuple of Tensors [B, ...]")
    if any(t.dim() == 0 for t in items):
        raise ValueError("inputs need a leading batch dim B; got a 0-d tensor")
    sizes = {t.shape[0] for t in items}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch dim B: leading sizes {[t.shape[0] for t in items]}")
    return items, sizes.pop()


def per_example_jacobian(fn: QueryFn, params: Params, inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, bool]:
    """J[b, k, p] = ∂ u_θ(z_b)_k / ∂θ_p at θ = params, one reverse-mode pass per output (jacrev), vmapped
    over the B inputs.

    ``fn(params, *z)`` computes u for ONE input (the b-th slice of each tensor in ``inputs``) and returns
    a scalar or a vector [K]. Returns ``(J [B, K, P], scalar)`` with ``scalar`` True when u is a scalar
    (then K = 1). P is laid out as in :func:`algorithms.uncertainty.params.flatten_params`.
    Under vmap, select with ``q.gather(0, a.unsqueeze(0)).squeeze(0)`` rather than ``q[a]`` (indexing
    with a tensor value is data-dependent control flow, which vmap rejects).
    """
    if not params:
        raise ValueError("params is empty: expected a dict {name: tensor} with at least one entry")
    items, batch = as_inputs(inputs)
    detached = {name: p.detach() for name, p in params.items()}
    in_dims = (None,) + (0,) * len(items)
    jac = torch.func.vmap(torch.func.jacrev(fn, argnums=0), in_dims=in_dims)(detached, *items)
    first = next(iter(detached))
    out_shape = tuple(jac[first].shape[1 : jac[first].dim() - detached[first].dim()])
    if len(out_shape) > 1:
        raise ValueError(f"fn must return a scalar or a vector [K] per input; got shape {out_shape}")
    k = out_shape[0] if out_shape else 1
    flat = torch.cat([jac[name].reshape(batch, k, -1) for name in detached], dim=-1)
    return flat, not out_shape
