"""Thin adapter from torch modules to pure functions of a parameter tuple (torch.func.functional_call)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from algorithms.meta.optimizers import Params


def param_names(module: nn.Module) -> list[str]:
    """Names of the module's parameters, in ``named_parameters`` order (the tuple order used here)."""
    return [n for n, _ in module.named_parameters()]


def param_tuple(module: nn.Module) -> Params:
    """The module's parameters as a tuple of detached clones (the functional θ)."""
    return tuple(p.detach().clone() for p in module.parameters())


def functional(module: nn.Module) -> Callable[..., Any]:
    """f(params, *args, **kwargs) = module(*args, **kwargs) evaluated at ``params`` (a tuple).

    Buffers are taken from the module itself.
    """
    names = param_names(module)

    def apply(params: Params, *args: Any, **kwargs: Any) -> Any:
        if len(params) != len(names):
            raise ValueError(f"got {len(params)} parameter tensors for a module with {len(names)}")
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), args, kwargs)

    return apply


def load_params_(module: nn.Module, params: Params) -> None:
    """Copy a parameter tuple into the module in place."""
    with torch.no_grad():
        for p, v in zip(module.parameters(), params, strict=True):
            p.copy_(v)


def num_params(params: Params | nn.Module) -> int:
    seq = params.parameters() if isinstance(params, nn.Module) else params
    return sum(t.numel() for t in seq)


def tensor_bytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params)


__all__ = ["functional", "load_params_", "num_params", "param_names", "param_tuple", "tensor_bytes", "Tensor"]
