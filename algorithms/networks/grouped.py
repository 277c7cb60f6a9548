"""Grouped MLPs: G independent towers (no shared parameter) run as one network, one matrix product per layer.

Shape letters: B inputs, D input features, G groups (towers), H a tower's hidden width, O a tower's outputs.

:class:`GroupedMLP` ``x [B, D] -> [B, G·O]``: columns g·O ... g·O + O − 1 are tower g's output, tower g being
the MLP ``D -> cfg.hidden -> O`` that :func:`algorithms.networks.build_mlp` builds (same blocks: layer, norm,
activation; no bias before a norm). It is initialised with exactly the draws of G such MLPs built one after
the other, so it equals ``torch.cat([mlp_g(x) for g in range(G)], -1)`` for those MLPs (tested); running the
towers as one network replaces G small layers by one batched product per layer (EVE's per-action Q).

Hidden features stay flat, ``[B, G·H]`` in tower-major order, so a hook on an activation module (plasticity
diagnostics) sees G·H units. Layers (parameters carry a leading group dimension):

- :class:`GroupedLinear` ``(groups, in_features, out_features)``: W [G, O, I], c [G, O];
  y[b, g, o] = Σ_i W[g, o, i] x[b, g, i] + c[g, o] for x [B, G·I] read as [B, G, I], or with
  ``shared_input`` (the first layer) y[b, g, o] = Σ_i W[g, o, i] x[b, i] + c[g, o] for x [B, I].
- :class:`GroupedNorm` ``(groups, width, kind)``: per group over its H features, γ, β [G, H];
  layer: x̂ = (x − μ_g) / sqrt(σ²_g + ε), rms: x̂ = x / sqrt(mean_g(x²) + ε); y = x̂ ⊙ γ_g + β_g.

Normalize-and-Project projects each tower's layer weight (and norm scale/offset) on its own, as for G separate
MLPs (:meth:`GroupedLinear.per_group`, :meth:`GroupedNorm.per_group`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algorithms.networks.builders import MLP, HiddenBlock, Network, _seeded, make_activation
from algorithms.networks.config import NetworkConfig


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, shared_input: bool) -> Tensor:
    """y [B, G·O] from x ([B, I] when ``shared_input``, else [B, G·I]), W [G, O, I], c [G, O] or None."""
    groups, out_f, in_f = weight.shape
    if shared_input:
        return F.linear(x, weight.reshape(groups * out_f, in_f), None if bias is None else bias.reshape(-1))
    if out_f == 1:  # one output per group (e.g. Q(s, a) per action): a rowwise dot product, fewer kernels
        y = (x.reshape(x.shape[0], groups, in_f) * weight.reshape(groups, in_f)).sum(-1)
        return y if bias is None else y + bias.reshape(groups)
    xg = x.reshape(x.shape[0], groups, in_f).transpose(0, 1)  # [G, B, I]
    y = torch.bmm(xg, weight.transpose(1, 2)).transpose(0, 1)  # [B, G, O]
    if bias is not None:
        y = y + bias
    return y.reshape(x.shape[0], groups * out_f)


class GroupedLinear(nn.Module):
    """G linear maps side by side (module docstring): W [G, O, I], optional c [G, O]."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True,
                 shared_input: bool = False):
        super().__init__()
        if groups < 1:
            raise ValueError(f"GroupedLinear: groups must be >= 1, got {groups}")
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.shared_input = shared_input
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W, c ~ U(−1/sqrt(I), 1/sqrt(I)): nn.Linear's default initialisation, per group."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return grouped_linear(x, self.weight, self.bias, self.shared_input)

    def per_group(self) -> list[list[Tensor]]:
        """[[W_g]] for each group g (views): the weight groups NaP projects separately."""
        return [[self.weight[g]] for g in range(self.groups)]

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, shared_input={self.shared_input}")


class GroupedNorm(nn.Module):
    """LayerNorm or RMSNorm (with offset) over each group's ``width`` features: γ, β [G, H]."""

    is_normalisation = True  # its 2-D γ is a norm scale, not a weight layer (plasticity diagnostics)

    def __init__(self, groups: int, width: int, kind: str = "layer", eps: float = 1e-5):
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"GroupedNorm: kind must be 'layer' or 'rms', got {kind!r}")
        self.groups, self.width, self.kind, self.eps = groups, width, kind, eps
        self.weight = nn.Parameter(torch.ones(groups, width))
        self.bias = nn.Parameter(torch.zeros(groups, width))

    def reset_parameters(self) -> None:
        """γ = 1, β = 0."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def normalise(self, x: Tensor) -> Tensor:
        """x̂ [B, G·H] (before γ, β)."""
        xg = x.reshape(x.shape[0], self.groups, self.width)
        if self.kind == "layer":
            xhat = F.layer_norm(xg, (self.width,), None, None, self.eps)
        else:
            xhat = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return xhat.reshape(x.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias.reshape(-1), self.normalise(x), self.weight.reshape(-1))

    def per_group(self) -> list[list[Tensor]]:
        """[[γ_g, β_g]] for each group g (views): the groups NaP projects jointly per tower."""
        return [[self.weight[g], self.bias[g]] for g in range(self.groups)]

    def extra_repr(self) -> str:
        return f"groups={self.groups}, width={self.width}, kind={self.kind!r}, eps={self.eps}"


class GroupedMLP(Network):
    """G MLPs ``in_dim -> cfg.hidden -> out_per_group`` as one network: x [B, D] -> [B, G·O] (module docstring)."""

    def __init__(self, in_dim: int, groups: int, out_per_group: int, cfg: NetworkConfig):
        super().__init__()
        if cfg.cnn is not None:
            raise ValueError("network.cnn: grouped networks (EVE's q_heads=per_action) take flat observations only")
        if cfg.activation == "crelu":
            raise ValueError("network.activation: crelu is not supported by grouped networks (EVE's "
                             "q_heads=per_action); use q_heads=shared")
        towers = [MLP(in_dim, out_per_group, cfg) for _ in range(groups)]  # the draws of G MLPs, in order
        self.groups = groups
        blocks, width = [], in_dim
        for i, hidden in enumerate(cfg.hidden):
            parts = [t.blocks[i] for t in towers]
            layer = GroupedLinear(groups, width, hidden, bias=parts[0].layer.bias is not None, shared_input=i == 0)
            norm: nn.Module = nn.Identity() if cfg.norm == "none" else GroupedNorm(groups, hidden, cfg.norm)
            with torch.no_grad():
                layer.weight.copy_(torch.stack([p.layer.weight for p in parts]))
                if layer.bias is not None:
                    layer.bias.copy_(torch.stack([p.layer.bias for p in parts]))
                if isinstance(norm, GroupedNorm):
                    norm.weight.copy_(torch.stack([p.norm.weight for p in parts]))
                    norm.bias.copy_(torch.stack([p.norm.bias for p in parts]))
                    norm.eps = parts[0].norm.eps
            blocks.append(HiddenBlock(layer, norm, make_activation(cfg.activation)))
            width = hidden
        self.blocks = nn.ModuleList(blocks)
        self.output = GroupedLinear(groups, width, out_per_group, shared_input=not cfg.hidden)
        with torch.no_grad():
            self.output.weight.copy_(torch.stack([t.output.weight for t in towers]))
            self.output.bias.copy_(torch.stack([t.output.bias for t in towers]))
        self.out_features = groups * out_per_group

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.output(x)


def build_grouped_mlp(in_dim: int, groups: int, out_per_group: int, cfg: NetworkConfig, *,
                      seed: int | None = None) -> GroupedMLP:
    """G MLPs ``in_dim -> cfg.hidden -> out_per_group`` as one :class:`GroupedMLP` (draws from ``seed`` when
    given, global RNG untouched; else from the global RNG like :func:`algorithms.networks.build_mlp`)."""
    if groups < 1:
        raise ValueError(f"build_grouped_mlp: groups must be >= 1, got {groups}")
    with _seeded(seed):
        return GroupedMLP(in_dim, groups, out_per_group, cfg)


__all__ = ["GroupedLinear", "GroupedMLP", "GroupedNorm", "build_grouped_mlp", "grouped_linear"]
