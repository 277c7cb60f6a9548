"""Plasticity metrics: pure functions on tensors, each with its exact definition.

Definitions: docs/methods.md#plasticity-metrics (a table of all of them); sources are named per function.
Shape letters: N probe inputs, D features (units) of one layer, P parameters.

A *feature matrix* Φ ∈ R^{N×D} stacks one layer's activations for the N probe inputs (conv maps are
flattened to D = C·H·W for the rank measures). Singular values σ_1 ≥ σ_2 ≥ … ≥ 0 are those of Φ
itself (not centred), as in Kumar et al. (2021) and Dohare et al. (2024).

The framework adapters (RLlib callback, task hook) live in ``rllib_plasticity.py``; this module only
imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

#: Activation modules whose outputs count as a layer's hidden units ("post-activations").
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip

#: Normalisation modules that make the preceding weight layer scale-invariant (NaP, Lyle et al. 2024).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Activation-based metrics


def _unit_major(activations: Tensor) -> Tensor:
    """[N, D] or [N, C, ...] -> [N, U] of |h| averaged over everything but the batch and unit dims.

    For conv maps a unit is a channel (dim 1), its activity averaged over spatial positions.
    """
    if activations.dim() < 2:
        raise ValueError(f"activations must be [N, units, ...], got shape {tuple(activations.shape)}")
    a = activations.detach().abs().float()
    if a.dim() > 2:
        a = a.flatten(2).mean(-1)
    return a


def dormant_scores(activations: Tensor) -> Tensor:
    """ReDo unit scores s_i = E_x|h_i(x)| / ((1/D) Σ_k E_x|h_k(x)|)   (Sokar et al., ICML 2023, eq. 1).

    activations: [N, D] (or [N, C, H, W]: units are channels). Returns s: [D]. A layer whose units are
    all exactly zero has scores 0 (every unit dormant).
    """
    mean_abs = _unit_major(activations).mean(0)  # E_x|h_i(x)|, [D]
    layer_mean = mean_abs.mean()
    if layer_mean == 0:
        return torch.zeros_like(mean_abs)
    return mean_abs / layer_mean


def dormant_ratio(activations: Tensor | Sequence[Tensor], tau: float = 0.025) -> float:
    """Fraction of dormant units, unit i dormant iff s_i ≤ τ   (Sokar et al., ICML 2023).

    s_i from :func:`dormant_scores`, computed per layer. Given several layers, the ratio is over all
    their hidden units pooled (#dormant units in all layers / #units in all layers). τ = 0 counts dead
    units (E_x|h_i(x)| = 0); τ = 0.025 and 0.1 are common.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    layers = [activations] if isinstance(activations, Tensor) else list(activations)
    if not layers:
        raise ValueError("dormant_ratio needs at least one layer of activations")
    dormant = total = 0
    for h in layers:
        s = dormant_scores(h)
        dormant += int((s <= tau).sum())
        total += s.numel()
    return dormant / total


def feature_matrix(activations: Tensor) -> Tensor:
    """Φ ∈ R^{N×D}: one row per input; conv maps flattened (D = C·H·W). Half precisions become float32."""
    if activations.dim() < 2:
        raise ValueError(f"activations must be [N, ...], got shape {tuple(activations.shape)}")
    phi = activations.detach().flatten(1)
    return phi if phi.dtype in (torch.float32, torch.float64) else phi.float()


def singular_values(features: Tensor) -> Tensor:
    """σ_1 ≥ … ≥ σ_min(N,D) ≥ 0 of the feature matrix Φ [N, D] (float64 result).

    The SVD runs in Φ's own precision (float32 for network activations: half the cost of float64,
    relative error ~1e-7·σ_1, far below what the rank measures resolve).
    """
    return torch.linalg.svdvals(feature_matrix(features)).double()


def _check_sv(s: Tensor) -> Tensor:
    s = s.detach().double().flatten()
    if s.numel() == 0 or (s < 0).any():
        raise ValueError("singular values must be a non-empty vector of non-negative numbers")
    return torch.sort(s, descending=True).values


def effective_rank_from_singular_values(s: Tensor) -> float:
    """exp(−Σ_i p_i log p_i), p_i = σ_i / Σ_k σ_k   (Roy & Vetterli, EUSIPCO 2007). 0 for Φ = 0."""
    s = _check_sv(s)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]  # 0·log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


def srank_from_singular_values(s: Tensor, delta: float = 0.01) -> int:
    """srank_δ = min{k : Σ_{i≤k} σ_i / Σ_i σ_i ≥ 1 − δ}   (Kumar et al., ICLR 2021, "implicit
    under-parameterisation"). δ = 0.01. 0 for Φ = 0."""
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    s = _check_sv(s)
    return _smallest_k_holding(s, 1.0 - delta)


def stable_rank_from_singular_values(s: Tensor) -> float:
    """Stable rank ‖Φ‖_F² / ‖Φ‖_2² = Σ_i σ_i² / σ_1²   (Rudelson & Vershynin 2007). 0 for Φ = 0.

    Not srank: some libraries call srank_δ "stable rank"; here the names follow the definitions.
    """
    s = _check_sv(s)
    if s[0] == 0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)


def approximate_rank_from_singular_values(s: Tensor, threshold: float = 0.99) -> int:
    """Smallest k with Σ_{i≤k} σ_i² / Σ_i σ_i² ≥ 0.99   (Dohare et al., Nature 2024). 0 for Φ = 0."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return _smallest_k_holding(_check_sv(s) ** 2, threshold)


def _smallest_k_holding(values: Tensor, fraction: float) -> int:
    total = values.sum()
    if total == 0:
        return 0
    cum = torch.cumsum(values, 0) / total
    # A tiny tolerance so that exact fractions (e.g. 0.99 of the total in 99 equal values) are not
    # lost to float64 round-off in the cumulative sum.
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def effective_rank(features: Tensor) -> float:
    """Effective rank of the feature matrix Φ [N, D]; see :func:`effective_rank_from_singular_values`."""
    return effective_rank_from_singular_values(singular_values(features))


def srank(features: Tensor, delta: float = 0.01) -> int:
    """srank_δ of the feature matrix Φ [N, D]; see :func:`srank_from_singular_values`."""
    return srank_from_singular_values(singular_values(features), delta)


def stable_rank(features: Tensor) -> float:
    """Stable rank ‖Φ‖_F²/‖Φ‖_2² of Φ [N, D]; see :func:`stable_rank_from_singular_values`."""
    return stable_rank_from_singular_values(singular_values(features))


def approximate_rank(features: Tensor, threshold: float = 0.99) -> int:
    """Approximate rank of Φ [N, D]; see :func:`approximate_rank_from_singular_values`."""
    return approximate_rank_from_singular_values(singular_values(features), threshold)


def rank_metrics(features: Tensor, delta: float = 0.01, threshold: float = 0.99) -> dict[str, float]:
    """All four rank measures of Φ [N, D] from one SVD: effective_rank, srank, stable_rank,
    approximate_rank."""
    s = singular_values(features)
    return {
        "effective_rank": effective_rank_from_singular_values(s),
        "srank": float(srank_from_singular_values(s, delta)),
        "stable_rank": stable_rank_from_singular_values(s),
        "approximate_rank": float(approximate_rank_from_singular_values(s, threshold)),
    }


def feature_norm(features: Tensor) -> float:
    """Feature norm E_x ‖φ(x)‖₂ = (1/N) Σ_n ‖Φ_n‖₂ over the probe inputs (rows of Φ [N, D])."""
    return float(feature_matrix(features).double().norm(dim=1).mean())


def feature_drift(features_t: Tensor, features_t_minus_k: Tensor) -> float:
    """Feature drift E_x ‖φ_t(x) − φ_{t−k}(x)‖₂ between two snapshots of the same layer on the same
    probe inputs (Φ_t, Φ_{t−k}: [N, D]); cf. Abel et al. 2023 (arXiv 2307.11044) convergence proxies."""
    a, b = feature_matrix(features_t).double(), feature_matrix(features_t_minus_k).double()
    if a.shape != b.shape:
        raise ValueError(f"feature snapshots differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).norm(dim=1).mean())


# ---------------------------------------------------------------------------------------------------
# Weight- and gradient-based metrics


def weight_norm(weight: Tensor) -> float:
    """‖W‖_F = sqrt(Σ_ij W_ij²) of one layer's weight (any shape; conv kernels flattened)."""
    return float(weight.detach().double().norm())


def gradient_norms(grad: Tensor) -> tuple[float, float]:
    """(‖g‖₁, ‖g‖₂) = (Σ_i |g_i|, sqrt(Σ_i g_i²)) of one layer's gradient g."""
    g = grad.detach().double().flatten()
    return float(g.abs().sum()), float(g.norm())


def parameter_drift(params_t: Mapping[str, Tensor], params_t_minus_k: Mapping[str, Tensor]) -> float:
    """Parameter drift ‖θ_t − θ_{t−k}‖₂ over all named parameters (both snapshots need the same names)."""
    if set(params_t) != set(params_t_minus_k):
        missing = sorted(set(params_t) ^ set(params_t_minus_k))
        raise ValueError(f"parameter snapshots differ in names: {missing[:5]}")
    sq = sum(float((params_t[k].detach().double() - params_t_minus_k[k].detach().double()).pow(2).sum())
             for k in params_t)
    return sq**0.5


#: Optimiser families of :func:`effective_learning_rate`.
EFFECTIVE_LR_OPTIMIZERS = ("sgd", "adam")


def effective_learning_rate(lr: float, weight_norm: float, optimizer: str) -> float:
    """Effective learning rate of a scale-invariant (normalised) layer   (Lyle et al., NeurIPS 2024, NaP).

    For L(w) = L(w/‖w‖) the direction ŵ = w/‖w‖ moves as if trained with
        SGD:  η_eff = η / ‖w‖²     (the gradient scales as 1/‖w‖ and ŵ moves by Δw/‖w‖),
        Adam: η_eff = η / ‖w‖      (Adam's step is scale-free, so only the 1/‖w‖ of ŵ remains).
    This is the closed form; :func:`measured_effective_learning_rate` measures it for one SGD step.
    """
    if optimizer not in EFFECTIVE_LR_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {EFFECTIVE_LR_OPTIMIZERS}, got {optimizer!r}")
    if weight_norm <= 0:
        raise ValueError(f"weight_norm must be > 0, got {weight_norm}")
    return lr / weight_norm**2 if optimizer == "sgd" else lr / weight_norm


def measured_effective_learning_rate(w_before: Tensor, w_after: Tensor, grad: Tensor) -> float:
    """η_eff measured from one step of a scale-invariant layer: ‖Δw‖ / (‖w‖² ‖∇_w L‖).

    Why: with ŵ = w/‖w‖ the step moves the direction by ‖Δŵ‖ ≈ ‖Δw‖/‖w‖, and the gradient with respect
    to the direction is ‖∇_ŵ L‖ = ‖w‖ ‖∇_w L‖, so η_eff = ‖Δŵ‖ / ‖∇_ŵ L‖. For SGD (Δw = −η ∇_w L) this
    equals η/‖w‖² exactly, the closed form of :func:`effective_learning_rate` (Lyle et al. 2024).
    """
    w0 = w_before.detach().double()
    dw = w_after.detach().double() - w0
    g = grad.detach().double().norm()
    if g == 0:
        raise ValueError("gradient is zero: the effective learning rate is undefined")
    return float(dw.norm() / (w0.norm() ** 2 * g))


def hessian_vector_product(loss_fn: Callable[[], Tensor], params: Sequence[Tensor],
                           vector: Sequence[Tensor]) -> list[Tensor]:
    """H v = ∇_θ (∇_θ L(θ) · v) by double backward (Pearlmutter 1994). One loss evaluation."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(g, p, v) for g, p, v in zip(grads, params, vector, strict=True) if g is not None]
    dot = sum((g * v).sum() for g, _, v in pairs)
    hv = torch.autograd.grad(dot, [p for _, p, _ in pairs], allow_unused=True)
    out, j = [], 0
    for g, p in zip(grads, params, strict=True):
        if g is None:
            out.append(torch.zeros_like(p))
        else:
            out.append(hv[j] if hv[j] is not None else torch.zeros_like(p))
            j += 1
    return [h.detach() for h in out]


def hessian_top_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> float:
    """Top Hessian eigenvalue of L at θ = params by power iteration on Hessian-vector products.

    v_0 ~ N(0, I) normalised; v_{t+1} = H v_t / ‖H v_t‖; λ_t = v_tᵀ H v_t (Rayleigh quotient). Stops
    when |λ_t − λ_{t−1}| ≤ tol·|λ_t| or after ``iters`` HVPs. Power iteration converges to the
    eigenvalue of largest *magnitude* (the sharpness λ_max when that is positive, the usual case near
    a minimum; Ghorbani et al., ICML 2019; Lyle et al., CoLLAs 2024). ``loss_fn`` re-evaluates the loss
    (with a graph to ``params``) on a fixed batch.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad")
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x**2).sum() for x in v))
    v = [x / norm for x in v]
    eig = None
    for _ in range(iters):
        hv = hessian_vector_product(loss_fn, params, v)
        new_eig = float(sum((h * x).sum() for h, x in zip(hv, v, strict=True)))
        norm = torch.sqrt(sum((h**2).sum() for h in hv))
        if norm == 0:
            return 0.0
        v = [h / norm for h in hv]
        if eig is not None and abs(new_eig - eig) <= tol * abs(new_eig):
            return new_eig
        eig = new_eig
    return float(eig)


# ---------------------------------------------------------------------------------------------------
# Finding layers in any torch module


def capture_activations(module: nn.Module, forward_fn: Callable[[], object]) -> dict[str, Tensor]:
    """Run ``forward_fn()`` with forward hooks on every activation module inside ``module``.

    Returns {qualified module name: output of its first call} (detached), in call order. Works for any
    torch module whose nonlinearities are nn.Module instances (:data:`ACTIVATION_TYPES`, or any module
    with ``is_activation = True`` such as :class:`algorithms.networks.builders.CReLU`); functional
    activations (F.relu inside forward) are invisible. A module instance called several times keeps
    only its first output, so a layer reused by two forward paths is not counted twice.
    """
    captured: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_mod, _inp, out):
            if name not in captured and isinstance(out, Tensor):
                captured[name] = out.detach()

        return hook

    try:
        for name, sub in module.named_modules():
            if isinstance(sub, ACTIVATION_TYPES) or getattr(sub, "is_activation", False):
                handles.append(sub.register_forward_hook(make_hook(name or "activation")))
        forward_fn()
    finally:
        for h in handles:
            h.remove()
    return captured


def weight_layers(module: nn.Module, trainable_only: bool = True) -> dict[str, Tensor]:
    """{layer name: weight} for every parameter with ≥ 2 dims (linear, conv, embedding weights).

    Layer name = qualified name of the parameter's owning module. Biases and normalisation scale and
    offset (1-D, or 2-D in a module with ``is_normalisation = True``) are not weights here. ``trainable_only`` skips frozen weights (requires_grad False),
    e.g. the target networks RLlib keeps inside DQN/SAC modules.
    """
    out: dict[str, Tensor] = {}
    for owner_name, owner in module.named_modules():
        if isinstance(owner, NORM_TYPES) or getattr(owner, "is_normalisation", False):
            continue  # per-group norm scales can be 2-D (algorithms.networks.grouped.GroupedNorm)
        for local, p in owner.named_parameters(recurse=False):
            if p.dim() >= 2 and (p.requires_grad or not trainable_only):
                out[owner_name or local] = p
    return out


def normalised_layers(module: nn.Module) -> list[str]:
    """Names of weight layers made scale-invariant by a normalisation layer right after them.

    A (sub)module may declare them with a ``normalised_layers()`` method returning names relative to
    itself (our network builders do); its subtree is then not searched further. Elsewhere the
    structural rule applies: inside an nn.Sequential, a module with a ≥ 2-D weight directly followed
    by one of :data:`NORM_TYPES` (the NaP layout Linear → Norm → activation).
    """
    names: list[str] = []
    declared_roots: list[str] = []
    for sub_name, sub in module.named_modules():
        if any(r == "" or sub_name == r or sub_name.startswith(r + ".") for r in declared_roots):
            continue  # inside a module that declared its own list
        declared = getattr(sub, "normalised_layers", None)
        if callable(declared):
            declared_roots.append(sub_name)
            names.extend(f"{sub_name}.{n}" if sub_name else n for n in declared())
            continue
        if not isinstance(sub, nn.Sequential):
            continue
        children = list(sub.named_children())
        for (child_name, child), (_, nxt) in zip(children, children[1:], strict=False):
            w = getattr(child, "weight", None)
            if isinstance(w, Tensor) and w.dim() >= 2 and isinstance(nxt, NORM_TYPES):
                names.append(f"{sub_name}.{child_name}" if sub_name else child_name)
    return names


def layer_activation_metrics(activations: Tensor, tau: float = 0.025, *, delta: float = 0.01,
                             ranks: bool = True) -> dict[str, float]:
    """Activation metrics of one layer: dormant_ratio (τ), dead_ratio (τ = 0), feature_norm, and (if
    ``ranks``) effective_rank, srank, stable_rank, approximate_rank of its feature matrix."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    s = dormant_scores(activations)  # one pass for both thresholds, as in dormant_ratio
    out = {
        "dormant_ratio": float((s <= tau).double().mean()),
        "dead_ratio": float((s <= 0).double().mean()),
        "feature_norm": feature_norm(activations),
    }
    if ranks:
        out.update(rank_metrics(activations, delta))
    return out
