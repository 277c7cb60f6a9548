"""Diagonal Fisher and diagonal-Σ Delta Variances for MLPs without materialising per-example gradients.

Shape letters: B examples, K outputs per example, P parameters (the order of ``module.named_parameters()``,
i.e. the layout of :func:`algorithms.uncertainty.params.module_params`).

The per-example Jacobian J [B, K, P] costs B·K·P memory; for the two quantities EVE needs every step
with a diagonal Σ it factorises per layer (Dangel et al. 2020, BackPACK). For a layer with input x_b,
normalised input x̂_b and output gradient g_b = ∂u_bk/∂y_b (row b of u depends on example b only):

    Linear     y = x Wᵀ + c :  ∂u_bk/∂W_ij = g_bi x_bj,   ∂u_bk/∂c_i = g_bi
    LayerNorm  y = x̂ ⊙ γ + β:  ∂u_bk/∂γ_i  = g_bi x̂_bi,  ∂u_bk/∂β_i = g_bi

so Σ_b (∂u_bk/∂W)² = (g ⊙ g)ᵀ (x ⊙ x) and Σ_ij (∂u_bk/∂W_ij)² d_ij = Σ_j [(g_b ⊙ g_b) D]_j x_bj², one
matrix product each, after one backward pass per output k. The grouped layers of
:mod:`algorithms.networks.grouped` are G such layers side by side (∂u_bk/∂W_goi = g_bgo x_bgi; x_bi when the
input is shared): the same sums, one batched product over the groups.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from algorithms.networks.builders import MLP, RMSNorm
from algorithms.networks.grouped import GroupedLinear, GroupedMLP, GroupedNorm, grouped_linear
from algorithms.uncertainty.params import Params, as_flat

FAST_LAYERS = (nn.Linear, nn.LayerNorm, GroupedLinear, GroupedNorm)
_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(module: nn.Module) -> tuple[list[tuple[str, nn.Module, str]], dict[int, str]]:
    """([(parameter name, owning module, local name)] in ``named_parameters()`` order, {id(submodule): name}),
    cached per module instance: EVE calls these functions several times per env step, and walking the
    module tree each time cost more than the small networks' arithmetic. Parameters are read live from
    their owners (a replaced Parameter object is seen); a module whose layers are added or removed after
    a first call needs :func:`clear_structure_cache`."""
    hit = _STRUCTURE.get(module)
    if hit is None:
        modules = dict(module.named_modules())
        entries = []
        for name, _ in module.named_parameters():
            owner_name, _, local = name.rpartition(".")
            entries.append((name, modules[owner_name], local))
        hit = _STRUCTURE[module] = (entries, {id(m): n for n, m in modules.items()})
    return hit


def clear_structure_cache() -> None:
    """Forget the cached module structures (see :func:`_structure`)."""
    _STRUCTURE.clear()
    _LEAF_PLANS.clear()


def named_params(module: nn.Module, trainable_only: bool = False) -> dict[str, nn.Parameter]:
    """``dict(module.named_parameters())`` (optionally only those with ``requires_grad``) from the cache."""
    out = {}
    for name, owner, local in _structure(module)[0]:
        p = getattr(owner, local)
        if not trainable_only or p.requires_grad:
            out[name] = p
    return out


Forward = Callable[[nn.Module], Tensor]
"""``forward(module) -> u`` [B] or [B, K] on a batch, row b depending on example b only, e.g.
``lambda m: m(obs).gather(1, actions[:, None])[:, 0]`` for Q(s, a)."""


def _layer_terms(
    module: nn.Module, forward: Forward, retain_graph: bool = False
) -> tuple[list[str], int, bool, Iterator]:
    """Runs ``forward`` with hooks; returns the trainable parameter names, u as [B, K], whether u is [B] (scalar
    per example) and an iterator over the K outputs of {param name: (kind, g [B, out], x or x̂ [B, in])}, kind
    one of "weight_linear", "weight_grouped", "weight_norm", "bias". ``retain_graph`` keeps forward's graph after the last
    backward pass (so a loss can reuse the same forward pass)."""
    entries = [(name, owner, leaf) for name, owner, leaf in _structure(module)[0]
               if getattr(owner, leaf).requires_grad]
    names = [name for name, _, _ in entries]
    if not names:
        raise ValueError(f"module {type(module).__name__} has no trainable parameters")
    layers: dict[str, nn.Module] = {}
    for name, owner, leaf in entries:
        owner_name = name.rpartition(".")[0]
        if not isinstance(owner, FAST_LAYERS) or leaf not in ("weight", "bias"):
            raise ValueError(
                f"parameter {name!r} belongs to {type(owner).__name__}; the fast path supports "
                f"{[c.__name__ for c in FAST_LAYERS]} only (use the torch.func functions for any module)"
            )
        layers[owner_name] = owner
    captured: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in layers}
    handles = [
        layer.register_forward_hook(lambda _m, inp, out, n=n: captured[n].append((inp[0].detach(), out)))
        for n, layer in layers.items()
    ]
    try:
        with torch.enable_grad():
            u = forward(module)
    finally:
        for h in handles:
            h.remove()
    for n, calls in captured.items():
        if len(calls) != 1 or calls[0][0].dim() != 2:
            shapes = [tuple(x.shape) for x, _ in calls]
            raise ValueError(f"layer {n!r} must run once on a [B, D] input; it ran with input shapes {shapes}")
    if u.dim() not in (1, 2):
        raise ValueError(f"forward must return u of shape [B] or [B, K], got {tuple(u.shape)}")
    outputs = u.unsqueeze(1) if u.dim() == 1 else u
    layer_names = list(layers)
    inputs = {}
    for n in layer_names:
        x, layer = captured[n][0][0], layers[n]
        if isinstance(layer, nn.Linear | GroupedLinear):
            inputs[n] = x
        elif isinstance(layer, GroupedNorm):
            inputs[n] = layer.normalise(x)
        else:
            inputs[n] = F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)

    kinds = []
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        layer = layers[owner_name]
        kinds.append((name, owner_name, "bias" if leaf == "bias" else (
            "weight_linear" if isinstance(layer, nn.Linear) else
            "weight_grouped" if isinstance(layer, GroupedLinear) else "weight_norm")))

    def per_output() -> Iterator[dict[str, tuple[str, Tensor, Tensor]]]:
        num_out = outputs.shape[1]
        for k in range(num_out):
            grads = torch.autograd.grad(outputs[:, k].sum(), [captured[n][0][1] for n in layer_names],
                                        retain_graph=retain_graph or k + 1 < num_out, allow_unused=True)
            by_layer = {}
            for n, g in zip(layer_names, grads, strict=True):
                g = torch.zeros_like(captured[n][0][1]) if g is None else g.detach()
                by_layer[n] = g
            yield {name: (kind, by_layer[owner_name], inputs[owner_name]) for name, owner_name, kind in kinds}

    return names, outputs, u.dim() == 1, per_output()


def _grouped_views(g: Tensor, x: Tensor, weight_shape: torch.Size) -> tuple[Tensor, Tensor, bool]:
    """(g [B, G, O], x [B, G, I] or [B, I], shared input?) for a GroupedLinear with weight [G, O, I]."""
    groups, out_f, in_f = weight_shape
    shared = x.shape[1] == in_f and groups > 1
    return g.reshape(-1, groups, out_f), x if shared else x.reshape(-1, groups, in_f), shared


def _square_once(cache: dict[int, Tensor], t: Tensor) -> Tensor:
    """t ⊙ t, computed once per tensor object within ``cache``."""
    if id(t) not in cache:
        cache[id(t)] = t.square()
    return cache[id(t)]


def mean_sq_grad_fast_with_batch(
    module: nn.Module, forward: Forward, *, retain_graph: bool = False
) -> tuple[Tensor, int]:
    """:func:`mean_sq_grad_fast` and the batch size B.

    With ``retain_graph`` the graph of ``forward``'s outputs survives, so a caller that keeps them (e.g.
    Q_θ(s, ·) captured inside ``forward``) can backpropagate a loss through the same forward pass: the
    diagonal Fisher costs one extra backward pass per output and no extra forward pass (EVE's learner with
    ``hand_gradients=False``)."""
    names, outputs, _, per_output = _layer_terms(module, forward, retain_graph)
    params = named_params(module)
    sums: dict[str, Tensor] = {}
    for terms in per_output:  # Σ over the K outputs
        for name, value in _squared_grad_sums(terms, params).items():
            sums[name] = sums[name] + value if name in sums else value
    return torch.cat([sums[name].reshape(-1) for name in names]) / outputs.shape[0], outputs.shape[0]


def _squared_grad_sums(terms: dict[str, tuple[str, Tensor, Tensor]], params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Σ_b (∂u_b/∂θ)² by parameter name (shaped like it) from one output's per-layer terms (module docstring)."""
    sums = {}
    squares: dict[int, Tensor] = {}  # g² and x² once per layer (weight and bias share them)
    for name, (kind, g, x) in terms.items():
        g2, shape = _square_once(squares, g), params[name].shape
        if kind == "weight_linear":
            sums[name] = g2.T @ _square_once(squares, x)
        elif kind == "weight_grouped":  # Σ_b g²_bgo x²_bgi, one batched product
            g2v, x2v, shared = _grouped_views(g2, _square_once(squares, x), shape)
            sums[name] = (g2.T @ x2v).view(shape) if shared else torch.bmm(g2v.permute(1, 2, 0), x2v.transpose(0, 1))
        elif kind == "weight_norm":
            sums[name] = (g2 * _square_once(squares, x)).sum(0).view(shape)
        else:
            sums[name] = g2.sum(0).view(shape)
    return sums


def mean_sq_grad_fast_and_vjp(
    module: nn.Module, forward: Forward
) -> tuple[Tensor, int, Callable[[Tensor], dict[str, Tensor]]]:
    """((1/B) Σ_b (∂u_b/∂θ)² [P], B, vjp) from ONE forward and ONE backward pass, for u [B] (one output per
    example); ``vjp(c)`` returns Σ_b c_b ∂u_b/∂θ by parameter name for weights c [B], from the same pass.

    With c_b = ∂L/∂u_b, ``vjp(c)`` is ∇_θ L for any loss L that depends on θ only through u, e.g. EVE's
    L = mean_b (G_b − u_b)² / (2σ²) with c_b = (u_b − G_b) / (σ² B). So the diagonal Fisher and the loss
    gradient share both passes (per layer Σ_b c_b g_b x_bᵀ beside Σ_b g_b² (x_b²)ᵀ; module docstring), and c
    may depend on the Fisher just computed. Same layers as :func:`mean_sq_grad_fast`."""
    names, outputs, scalar, per_output = _layer_terms(module, forward)
    if not scalar:
        raise ValueError(f"forward must return one output per example, u [B]; got {tuple(outputs.shape)}")
    mean_sq, vjp = _fisher_and_vjp(next(per_output), named_params(module), names, outputs.shape[0])
    return mean_sq, outputs.shape[0], vjp


def _fisher_and_vjp(
    terms: dict[str, tuple[str, Tensor, Tensor]], params: dict[str, Tensor], names: list[str], batch: int
) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """(1/B) Σ_b (∂u_b/∂θ)² [P] and ``vjp(c) = Σ_b c_b ∂u_b/∂θ`` from the per-layer terms of ONE output."""
    sums = _squared_grad_sums(terms, params)

    def vjp(c: Tensor) -> dict[str, Tensor]:
        if c.shape != (batch,):
            raise ValueError(f"vjp: weights must have shape ({batch},), got {tuple(c.shape)}")
        grads = {}
        weighted: dict[int, Tensor] = {}  # c_b g_b once per layer
        for name, (kind, g, x) in terms.items():
            if id(g) not in weighted:
                weighted[id(g)] = g * c.to(g)[:, None]
            cg = weighted[id(g)]
            shape = params[name].shape
            if kind == "weight_linear":
                grads[name] = cg.T @ x
            elif kind == "weight_grouped":
                cgv, xv, shared = _grouped_views(cg, x, shape)
                grads[name] = (cg.T @ xv).view(shape) if shared else torch.bmm(cgv.permute(1, 2, 0), xv.transpose(0, 1))
            elif kind == "weight_norm":
                grads[name] = (cg * x).sum(0).view(shape)
            else:
                grads[name] = cg.sum(0).view(shape)
        return grads

    return torch.cat([sums[name].reshape(-1) for name in names]) / batch, vjp


_REVERSE_LEAVES = (nn.Linear, nn.LayerNorm, GroupedLinear, GroupedNorm, nn.ReLU, nn.Tanh, nn.ELU, nn.Identity)


def _norm_forward(leaf: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y, x̂, 1/s) of a LayerNorm over the last dim or a GroupedNorm, x̂ and 1/s shaped like x's groups."""
    if isinstance(leaf, GroupedNorm):
        b, g, h = x.shape[0], leaf.groups, leaf.width
        xv = x.reshape(b, g, h)
        if leaf.kind == "layer":
            xhat, _, inv = torch.native_layer_norm(xv, (h,), None, None, leaf.eps)
        else:
            inv = torch.rsqrt(xv.pow(2).mean(-1, keepdim=True) + leaf.eps)
            xhat = xv * inv
        return torch.addcmul(leaf.bias, xhat, leaf.weight).reshape(b, g * h), xhat, inv
    xhat, _, inv = torch.native_layer_norm(x, leaf.normalized_shape, None, None, leaf.eps)
    y = xhat if leaf.weight is None else xhat * leaf.weight
    return (y if leaf.bias is None else y + leaf.bias), xhat, inv


def _activation_derivative(leaf: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
    """f'(x) of an elementwise activation y = f(x) (forward- and reverse-mode rules both multiply by it):
    ReLU 1[x > 0]; Tanh 1 − y²; ELU 1 for x > 0 else y + α (= min(y + 1, 1) when α = 1); Identity 1.
    None for other modules."""
    if isinstance(leaf, nn.Identity):
        return torch.ones_like(x)
    if isinstance(leaf, nn.ReLU):
        return (x > 0).to(x.dtype)
    if isinstance(leaf, nn.Tanh):
        return 1 - y * y
    if isinstance(leaf, nn.ELU) and not leaf.inplace:
        return (y + 1.0).clamp_(max=1.0) if leaf.alpha == 1.0 else torch.where(x > 0, 1.0, y + leaf.alpha)
    return None


def _selected_terms(module: nn.Module, x: Tensor, index: Tensor) -> tuple[Tensor, dict] | None:
    """(f(x) [B, K], per-layer terms of u_b = f(x)[b, index_b]) by a hand-written forward and reverse pass
    for chains of Linear, LayerNorm (last dim), grouped layers and ReLU/Tanh/ELU/Identity whose parameters
    are all trainable, without autograd; None for anything else. Reverse rules, g = ∂(Σ_b u_b)/∂(output):
    Linear: g_x = g W; ReLU: g ⊙ 1[x > 0]; Tanh: g ⊙ (1 − y²); ELU: g ⊙ (1 if x > 0 else y + α);
    LayerNorm (x̂ = (x − μ)/s): g_x̂ = g ⊙ γ, g_x = (g_x̂ − mean(g_x̂) − x̂ ⊙ mean(g_x̂ ⊙ x̂))/s (RMS: without
    the mean(g_x̂) term)."""
    plan = _leaf_plan(module)
    if plan is None or any(not isinstance(leaf, _REVERSE_LEAVES) for leaf, _ in plan):
        return None
    if any((isinstance(leaf, nn.LayerNorm) and len(leaf.normalized_shape) != 1) or getattr(leaf, "inplace", False)
           for leaf, _ in plan):
        return None
    if any(not p.requires_grad for p in named_params(module).values()):
        return None
    with torch.no_grad():
        caches, h = [], x
        for leaf, _ in plan:
            if isinstance(leaf, nn.LayerNorm | GroupedNorm):
                y, xhat, inv = _norm_forward(leaf, h)
                caches.append((h, xhat, inv))
            else:
                y = leaf(h)
                caches.append((h, y, None))
            h = y
        out = h
        if out.dim() != 2:
            return None
        g = torch.zeros_like(out).scatter_(1, index.reshape(-1, 1), 1.0)
        terms: dict[str, tuple[str, Tensor, Tensor]] = {}
        for i in range(len(plan) - 1, -1, -1):
            (leaf, names), (xin, a, inv) = plan[i], caches[i]
            if isinstance(leaf, nn.Linear | GroupedLinear):
                kind = "weight_linear" if isinstance(leaf, nn.Linear) else "weight_grouped"
                for local, full in names:
                    terms[full] = ("bias" if local == "bias" else kind, g, xin)
                if i == 0:
                    break
                if isinstance(leaf, nn.Linear):
                    g = g @ leaf.weight
                elif leaf.shared_input:
                    g = g @ leaf.weight.reshape(-1, leaf.in_features)
                else:
                    groups, out_f, in_f = leaf.weight.shape
                    gv = g.reshape(-1, groups, out_f)
                    g = (gv * leaf.weight[:, 0] if out_f == 1 else
                         torch.bmm(gv.transpose(0, 1), leaf.weight).transpose(0, 1)).reshape(-1, groups * in_f)
            elif isinstance(leaf, nn.LayerNorm | GroupedNorm):
                xhat = a
                gv = g.reshape(xhat.shape)
                for local, full in names:
                    terms[full] = ("bias" if local == "bias" else "weight_norm", g, xhat.reshape(g.shape))
                gx = gv if leaf.weight is None else gv * leaf.weight
                proj = (gx * xhat).mean(-1, keepdim=True)
                if isinstance(leaf, GroupedNorm) and leaf.kind == "rms":
                    g = ((gx - xhat * proj) * inv).reshape(g.shape)
                else:
                    g = ((gx - gx.mean(-1, keepdim=True) - xhat * proj) * inv).reshape(g.shape)
            elif not isinstance(leaf, nn.Identity):
                g = g * _activation_derivative(leaf, xin, a)
        return out, {full: terms[full] for full in named_params(module)}


def mean_sq_grad_fast_and_vjp_selected(
    module: nn.Module, x: Tensor, index: Tensor
) -> tuple[Tensor, Tensor, int, Callable[[Tensor], dict[str, Tensor]]]:
    """:func:`mean_sq_grad_fast_and_vjp` for u_b = f(x)[b, index_b] (e.g. Q_θ(s_b, a_b)), also returning f(x)
    [B, K] (detached): (f(x), (1/B) Σ_b (∂u_b/∂θ)², B, vjp). Chains of Linear, LayerNorm, grouped layers and
    ReLU/Tanh/ELU (networks from :func:`algorithms.networks.build_mlp` and ``build_grouped_mlp``) take a
    hand-written reverse pass without autograd (:func:`_selected_terms`; same values); other modules the
    hooked autograd pass."""
    chain = _selected_terms(module, x, index)
    if chain is None:
        captured: dict[str, Tensor] = {}

        def forward(m: nn.Module) -> Tensor:
            captured["out"] = m(x)
            return captured["out"].gather(1, index.reshape(-1, 1)).squeeze(1)

        mean_sq, batch, vjp = mean_sq_grad_fast_and_vjp(module, forward)
        return captured["out"].detach(), mean_sq, batch, vjp
    out, terms = chain
    params = named_params(module)
    mean_sq, vjp = _fisher_and_vjp(terms, params, list(params), out.shape[0])
    return out, mean_sq, out.shape[0], vjp


def mean_sq_grad_fast(module: nn.Module, forward: Forward) -> Tensor:
    """(1/B) Σ_b Σ_k (∂u_bk/∂θ)² [P], the numerator of the diagonal Fisher, for MLPs (Linear, LayerNorm).

    Equals ``per_example_jacobian(...)[0].square().sum((0, 1)) / B`` (module docstring for the identity)
    at the cost of K backward passes. Every trainable parameter must belong to an ``nn.Linear`` or
    ``nn.LayerNorm`` applied once to a [B, D] input; other modules raise (use ``fisher_diagonal``).
    """
    return mean_sq_grad_fast_with_batch(module, forward)[0]


def delta_variance_fast(module: nn.Module, forward: Forward, covariance: Tensor | Params) -> Tensor:
    """Delta Variance with a diagonal Σ = diag(d) for MLPs, Var[u_bk] ≈ Σ_p (∂u_bk/∂θ_p)² d_p, without
    per-example gradients (Schmitt et al. 2025; module docstring for the per-layer identity).

    ``covariance`` is d as a [P] vector or a dict by parameter name (order of ``named_parameters()``).
    Returns [B] for u [B] and the variances [B, K] for u [B, K] (no cross-covariances).
    """
    names, _, scalar, per_output = _layer_terms(module, forward)
    params = named_params(module, trainable_only=True)
    diag = as_flat(covariance, params, "covariance")
    d = {}
    start = 0
    for name in names:
        d[name] = diag[start : start + params[name].numel()].reshape(params[name].shape)
        start += params[name].numel()
    columns = []
    for terms in per_output:
        var = None
        for name, (kind, g, x) in terms.items():
            g2 = g.square()
            dn = d[name].to(g2)
            if kind == "weight_linear":
                term = ((g2 @ dn) * x.square()).sum(1)
            elif kind == "weight_grouped":  # Σ_goi g²_bgo d_goi x²_bgi
                g2v, x2v, shared = _grouped_views(g2, x.square(), dn.shape)
                if shared:
                    term = ((g2 @ dn.reshape(-1, dn.shape[-1])) * x2v).sum(1)
                else:
                    term = (torch.bmm(g2v.transpose(0, 1), dn).transpose(0, 1) * x2v).sum((1, 2))
            elif kind == "weight_norm":
                term = (g2 * x.square()) @ dn.reshape(-1)
            else:
                term = g2 @ dn.reshape(-1)
            var = term if var is None else var + term
        columns.append(var)
    out = torch.stack(columns, dim=1)
    return out[:, 0] if scalar else out


# -- forward mode: J δ for MLPs ----------------------------------------------------------------------
def _leaf_sequence(module: nn.Module) -> list[nn.Module] | None:
    """The leaf modules of ``module`` in execution order when it is a plain chain (nn.Sequential or
    ModuleList of chains, or a network with ``blocks`` then ``output`` as built by
    :func:`algorithms.networks.build_mlp`), else None."""
    if isinstance(module, MLP | GroupedMLP):
        seq = [leaf for block in module.blocks for leaf in (_leaf_sequence(block) or [None])]
        if module.output is not None:
            seq.append(module.output)
        return None if any(m is None for m in seq) else seq
    if isinstance(module, nn.Sequential | nn.ModuleList):
        seq = [leaf for child in module for leaf in (_leaf_sequence(child) or [None])]
        return None if any(m is None for m in seq) else seq
    return [module] if isinstance(module, _JVP_LEAVES) else None


_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.ELU, nn.GELU, nn.SiLU, nn.Identity)
_JVP_LEAVES = (nn.Linear, nn.LayerNorm, RMSNorm, GroupedLinear, GroupedNorm, *_ELEMENTWISE)


_LEAF_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _leaf_plan(module: nn.Module) -> list[tuple[nn.Module, list[tuple[str, str]]]] | None:
    """:func:`_leaf_sequence` with each leaf's (local, full) parameter names, cached like :func:`_structure`."""
    if module in _LEAF_PLANS:
        return _LEAF_PLANS[module]
    leaves = _leaf_sequence(module)
    plan = None
    if leaves is not None:
        prefix = _structure(module)[1]
        plan = []
        for leaf in leaves:
            name = prefix[id(leaf)]
            plan.append((leaf, [(k, f"{name}.{k}" if name else k) for k, _ in leaf.named_parameters(recurse=False)]))
    _LEAF_PLANS[module] = plan
    return plan


def _leaf_jvp(leaf: nn.Module, x: Tensor, dx: Tensor | None, dp: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(leaf(x), d leaf(x)) for an input tangent dx (None: zero) and parameter tangents dp (by local name)."""
    if isinstance(leaf, nn.Linear):
        y = F.linear(x, leaf.weight, leaf.bias)
        dy = F.linear(x, dp["weight"], dp.get("bias"))
        return y, dy if dx is None else dy + F.linear(dx, leaf.weight)
    if isinstance(leaf, GroupedLinear):
        y = leaf(x)
        if dx is not None and leaf.out_features == 1 and not leaf.shared_input:  # dy = Σ_i (dx W + x δW), + δb
            groups, in_f = leaf.groups, leaf.in_features
            xv, dxv = x.reshape(-1, groups, in_f), dx.reshape(-1, groups, in_f)
            dy = torch.addcmul(dxv * leaf.weight.reshape(groups, in_f), xv, dp["weight"].reshape(groups, in_f)).sum(-1)
            return y, dy if dp.get("bias") is None else dy + dp["bias"].reshape(groups)
        dy = grouped_linear(x, dp["weight"], dp.get("bias"), leaf.shared_input)
        return y, dy if dx is None else dy + grouped_linear(dx, leaf.weight, None, leaf.shared_input)
    if dx is None:
        dx = torch.zeros_like(x)
    if isinstance(leaf, nn.Identity):
        return x, dx
    if isinstance(leaf, _ELEMENTWISE) and not getattr(leaf, "inplace", False):
        y = leaf(x)
        derivative = _activation_derivative(leaf, x, y)
        if derivative is not None:
            return y, dx * derivative
    if isinstance(leaf, nn.LayerNorm | GroupedNorm):
        # x̂ = (x − μ)/s per group (RMS: x/s): dx̂ = (dx − [mean(dx)] − x̂ ⊙ mean(dx ⊙ x̂)) / s;
        # y = x̂ ⊙ γ + β, dy = dx̂ ⊙ γ + x̂ ⊙ δγ + δβ
        if isinstance(leaf, nn.LayerNorm) and len(leaf.normalized_shape) != 1:
            raise ValueError("the forward-mode fast path supports LayerNorm over the last dimension only")
        y, xhat, inv = _norm_forward(leaf, x)
        dxv = dx.reshape(xhat.shape)
        centred = dxv if isinstance(leaf, GroupedNorm) and leaf.kind == "rms" else dxv - dxv.mean(-1, keepdim=True)
        dxhat = torch.addcmul(centred, xhat, (dxv * xhat).mean(-1, keepdim=True), value=-1.0).mul_(inv)
        if leaf.weight is None:
            return y, dxhat.reshape(dx.shape)
        dy = xhat * dp["weight"] if leaf.bias is None else torch.addcmul(dp["bias"], xhat, dp["weight"])
        return y, torch.addcmul(dy, dxhat, leaf.weight).reshape(dx.shape)
    if isinstance(leaf, RMSNorm):
        if len(leaf.shape) != 1:
            raise ValueError("the forward-mode fast path supports RMSNorm over the last dimension only")
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + leaf.eps)
        dr = -(r**3) * (x * dx).mean(-1, keepdim=True)
        y = leaf.weight * x * r + leaf.bias
        dy = dp["weight"] * x * r + leaf.weight * (dx * r + x * dr) + dp["bias"]
        return y, dy
    # other elementwise activations: their own jvp (no parameters)
    return torch.func.jvp(leaf, (x,), (dx,))


def linearised_forward(module: nn.Module, x: Tensor, tangent: Tensor | Params) -> tuple[Tensor, Tensor]:
    """(f_θ(x), J_θ f_θ(x) · δ): the output and its directional derivative along a parameter perturbation δ,
    i.e. the first-order (linearised) change f_{θ+δ}(x) − f_θ(x) ≈ J δ, without building a graph.

    ``tangent`` is δ as a [P] vector in ``named_parameters()`` order or a dict by parameter name. For chains
    of ``nn.Linear``, ``nn.LayerNorm``, the project's RMSNorm and elementwise activations (e.g. networks from
    :func:`algorithms.networks.build_mlp`) the tangent is pushed through layer by layer by hand
    (Linear: dy = dx Wᵀ + x δWᵀ + δb; ReLU: dy = dx ⊙ 1[x > 0]; ELU: dy = dx ⊙ (1 if x > 0 else y + α); LayerNorm with x̂ = (x − μ)/s:
    dx̂ = (dx − mean(dx) − x̂ ⊙ mean(dx ⊙ x̂))/s, dy = γ ⊙ dx̂ + δγ ⊙ x̂ + δβ), which costs about two
    forward passes; grouped networks (:mod:`algorithms.networks.grouped`, e.g. EVE's per-action Q) go the same
    way, all towers at once; any other module goes through ``torch.func.jvp`` (same values, more overhead).
    """
    params = named_params(module)
    if isinstance(tangent, dict):
        tangents = tangent
    else:
        flat = tangent.reshape(-1)
        if flat.numel() != sum(p.numel() for p in params.values()):
            raise ValueError(f"tangent has {flat.numel()} entries; the module has "
                             f"{sum(p.numel() for p in params.values())} parameters")
        tangents, start = {}, 0
        for name, p in params.items():
            tangents[name] = flat[start : start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
    with torch.no_grad():
        leaves = _leaf_plan(module)
        if leaves is None:
            def fn(p: Params) -> Tensor:
                return torch.func.functional_call(module, p, (x,))

            y, dy = torch.func.jvp(fn, ({k: v.detach() for k, v in params.items()},), (tangents,))
            return y.detach(), dy.detach()
        dx = None  # the input does not depend on θ
        for leaf, names in leaves:
            x, dx = _leaf_jvp(leaf, x, dx, {k: tangents[full] for k, full in names})
        return x, dx
