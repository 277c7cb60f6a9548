"""Parameter dictionaries and their flat layout, shared by Fisher estimates, covariances and Delta Variances.

Shape letters: B inputs (queries or examples), K outputs per input, P parameters in total.

A parameter dict ``{name: tensor}`` (the form ``torch.func.functional_call`` takes) is flattened in its
iteration order, each tensor in row-major order::

    vec = cat([params[name].reshape(-1) for name in params])      # [P]

Every flat vector or matrix in this package (diagonal Fisher, covariance, per-example Jacobians)
uses this layout, so a ``[P]`` or ``[P, P]`` tensor lines up with the dict it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

Params = Mapping[str, Tensor]
"""Parameters by name, as ``torch.func.functional_call`` takes them."""

QueryFn = Callable[..., Tensor]
"""``fn(params, *z) -> u``: a quantity of interest for ONE input z (no batch dim), scalar or [K]."""


def module_params(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of ``module`` by name, detached (a snapshot θ̂ for torch.func)."""
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"module {type(module).__name__} has no trainable parameters")
    return params


def module_fn(module: nn.Module, indexed: bool = False) -> QueryFn:
    """``fn(params, x) = module(x)`` for one unbatched input ``x``, evaluated with ``params``.

    The module sees a batch of one (``x.unsqueeze(0)``) and the batch dim is removed from the output,
    so modules that expect a batch dimension work; buffers are the module's own. With ``indexed=True``
    the function is ``fn(params, x, i) = module(x)[i]`` for an integer tensor ``i`` (e.g. Q(s, a) from a
    network with one output per action), selected with ``gather`` so that it works under vmap.
    """

    def fn(params: Params, x: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(params), (x.unsqueeze(0),)).squeeze(0)

    def fn_indexed(params: Params, x: Tensor, i: Tensor) -> Tensor:
        return fn(params, x).gather(0, i.reshape(1)).squeeze(0)

    return fn_indexed if indexed else fn


def num_params(params: Params) -> int:
    """P = total number of scalars in ``params``."""
    return sum(p.numel() for p in params.values())


def flatten_params(params: Params) -> Tensor:
    """``cat([params[name].reshape(-1) for name in params])`` -> [P]."""
    if not params:
        raise ValueError("params is empty: expected a dict {name: tensor} with at least one entry")
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten_like(vec: Tensor, like: Params) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_params`: split a [P] vector into tensors shaped like ``like``."""
    total = num_params(like)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(f"vec has shape {tuple(vec.shape)}; expected ({total},) to match the parameters")
    out: dict[str, Tensor] = {}
    start = 0
    for name, p in like.items():
        out[name] = vec[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def as_flat(value: Tensor | Params, params: Params, what: str) -> Tensor:
    """A [P] vector from either a flat tensor or a dict with the same names and shapes as ``params``."""
    total = num_params(params)
    if isinstance(value, Mapping):
        if list(value.keys()) != list(params.keys()):
            raise ValueError(
                f"{what} has keys {list(value.keys())}; expected the parameter names in order {list(params)}"
            )
        for name, p in params.items():
            if tuple(value[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"{what}[{name!r}] has shape {tuple(value[name].shape)}; expected {tuple(p.shape)}"
                )
        return flatten_params(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a Tensor of shape ({total},) or a dict like params, got {type(value)}")
    if value.dim() != 1 or value.numel() != total:
        raise ValueError(f"{what} has shape {tuple(value.shape)}; expected ({total},) (P = number of parameters)")
    return value
