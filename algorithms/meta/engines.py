"""Meta-gradients through a truncated unroll of T inner optimiser steps.

Bilevel problem (DataRater, Calian et al. 2025, eq. 1; MixFlow-MG, Kemaev et al. 2025, §2):

    θ_{t+1} = Υ(θ_t, g_t, s_t),   g_t = ∇_θ L_in(θ_t, η; b_t),      t = 0..T−1
    L_out(η) = L_out(θ_T; b_out),   meta-gradient  dL_out/dη.

Backpropagating through one inner step needs the vector-Hessian products  vᵀ∇²_θθ L_in  and
vᵀ∇²_θη L_in  (the VJP of the gradient map θ, η ↦ ∇_θL_in). The engines differ only in how they get
them and what they keep alive between the forward and the backward pass:

- ``reverse``: reverse-over-reverse. Each inner gradient is taken with ``create_graph=True`` and the
  whole graph of all T inner backward passes stays alive until the outer backward (memory O(T ·
  activations)).
- ``reverse_remat``: the same products, but each inner step is a custom autograd Function that saves
  only its inputs (θ_t, the optimiser state s_t, η) and recomputes its double-backward graph inside
  its own backward pass (rematerialisation per inner step; memory O(T · |θ|) + one step's graph).
- ``mixflow``: MixFlow-MG (Kemaev et al. 2025, §3). Only the inner *gradient* is wrapped in a custom
  autograd Function: its forward returns ∇_θL_in(θ, η) without keeping a graph and saves only
  (θ, η); its backward uses the symmetry of second derivatives,

      vᵀ ∂(∇_θL)/∂θ = ∇²_θθL · v,     vᵀ ∂(∇_θL)/∂η = ∇²_ηθL · v,

  i.e. one forward-mode JVP of θ ↦ (∇_θL, ∇_ηL) in the cotangent direction v (forward-over-reverse,
  ``torch.func.jvp`` over ``torch.func.grad``). Ordinary autograd differentiates the optimiser's
  elementwise update Υ around it (which saves a few |θ|-sized tensors per step for Adam).
  With a :class:`WeightedInnerLoss` whose ``hvp="reverse"``, the same backward gets these products
  by reverse-over-reverse on the recomputed chunk instead (same saved tensors, same numbers; cheaper in
  eager PyTorch on CPU for small chunks). With ``compile=True`` the per-chunk gradient of the forward
  and the per-chunk JVP of the backward are pure ``torch.func`` functions compiled once with
  ``torch.compile`` (inductor fuses the primal and tangent passes of the JVP; same products, same saved
  tensors).
- ``mixflow_remat``: MixFlow-MG combined with per-step rematerialisation ("combine with remat"): the
  step Function saves (θ_t, s_t, η) only and its backward recomputes the update around the MixFlow
  gradient, so not even the optimiser's intermediates are kept across steps.

All engines compute the same mathematical quantity (tested to 1e-8 relative in float64).

Shapes: parameters, optimiser state and meta-parameters are flat tuples of tensors; a batch is any
object the loss functions understand (it is held by reference, never copied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from algorithms.meta.optimizers import InnerOptimizer, Params, State

Meta = tuple[Tensor, ...]
InnerLoss = Callable[[Params, Meta, Any], Tensor]
"""L_in(θ, η; b) -> scalar."""
OuterLoss = Callable[[Params, Any], Tensor]
"""L_out(θ; b) -> scalar."""

ENGINES = ("reverse", "reverse_remat", "mixflow", "mixflow_remat")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"meta-gradient engine={engine!r}: allowed values are {', '.join(ENGINES)}")
    return engine


# --- losses with per-example structure (lets MixFlow-MG work in microbatches) -------------------


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """The examples [start, stop) of a batch that is a tensor or a (named) tuple of tensors [B, ...]."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, tuple):
        parts = [slice_batch(b, start, stop) for b in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else tuple(parts)
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into microbatches")


def batch_size(batch: Any) -> int:
    return batch.shape[0] if isinstance(batch, Tensor) else batch_size(batch[0])


def _chunks(n: int, microbatch: int | None) -> list[tuple[int, int]]:
    step = n if not microbatch else microbatch
    return [(i, min(i + step, n)) for i in range(0, n, step)]


@dataclass(frozen=True)
class WeightedInnerLoss:
    """L_in(θ, η; b) = Σ_i w_i(η; b) · ℓ_i(θ; b)   (per-example weights times per-example losses).

    Called as a function it is an ordinary :data:`InnerLoss` (all engines accept it). The MixFlow
    engines use the structure: the inner gradient g(θ, w) = Σ_i w_i ∇_θℓ_i(θ) is wrapped with w as
    its meta input (the map η ↦ w is differentiated by ordinary autograd), and because g is a sum over
    examples, its forward and its JVP backward run ``microbatch`` examples at a time:

        vᵀ∂g/∂θ = Σ_c Σ_{i∈c} w_i ∇²ℓ_i v,     vᵀ∂g/∂w_i = ∇ℓ_i · v  (the JVP of ℓ_i in direction v),

    which bounds the transient memory of the JVP by one microbatch.
    """

    per_example_loss: Callable[[Params, Any], Tensor]
    """ℓ(θ; b) -> [B]."""
    weights: Callable[[Meta, Any], Tensor]
    """w(η; b) -> [B]."""
    microbatch: int | None = None
    """Examples per chunk in the MixFlow forward and backward (None: the whole batch)."""
    hvp: str = "forward"
    """How the MixFlow backward gets (vᵀ∂g/∂θ, vᵀ∂g/∂w) from the saved inputs: ``forward`` =
    forward-over-reverse (torch.func.jvp of the gradient; MixFlow-MG proper), ``reverse`` =
    reverse-over-reverse on the recomputed chunk (gradient with ``create_graph``, then its VJP). Same
    numbers and the same saved tensors; ``reverse`` is faster in PyTorch eager on CPU (see
    benchmarks/mixflow_memory.py), with a transient of one chunk's double-backward graph."""
    compile: bool = False
    """Run the per-chunk gradient Σ_{i∈c} w_i∇ℓ_i (MixFlow forward) and, with ``hvp="forward"``, the
    per-chunk JVP (MixFlow backward) as ``torch.compile``d ``torch.func`` functions
    (:func:`weighted_chunk_grad`, :func:`weighted_chunk_jvp`; full graph, static shapes: one compilation
    per chunk shape, paid on the first meta-gradient). Same formulas and saved tensors as eager."""

    def __post_init__(self) -> None:
        if self.hvp not in ("forward", "reverse"):
            raise ValueError(f"WeightedInnerLoss hvp={self.hvp!r}: allowed values are 'forward', 'reverse'")

    def __call__(self, params: Params, meta: Meta, batch: Any) -> Tensor:
        return (self.weights(meta, batch) * self.per_example_loss(params, batch)).sum()

    @cached_property
    def compiled(self) -> tuple[Callable[..., Params], Callable[..., tuple[Params, Tensor]]]:
        """(chunk gradient, chunk JVP) of this loss, compiled on first use (``compile=True``)."""
        pel = self.per_example_loss

        def grad(params: Params, chunk: Any, w_c: Tensor) -> Params:
            return weighted_chunk_grad(pel, params, chunk, w_c)

        def jvp(params: Params, v: Params, chunk: Any, w_c: Tensor) -> tuple[Params, Tensor]:
            return weighted_chunk_jvp(pel, params, v, chunk, w_c)

        return (torch.compile(grad, fullgraph=True, dynamic=False),
                torch.compile(jvp, fullgraph=True, dynamic=False))

    def __getstate__(self) -> dict:
        # Compiled functions do not pickle; a copy compiles its own on first use.
        return {k: v for k, v in self.__dict__.items() if k != "compiled"}


def weighted_chunk_grad(per_example_loss: Callable[[Params, Any], Tensor], params: Params, chunk: Any,
                        w_c: Tensor) -> Params:
    """g_c = Σ_{i∈c} w_i ∇_θℓ_i(θ)   (torch.func.grad of the chunk's weighted loss; w is a constant)."""
    return torch.func.grad(lambda p: (w_c * per_example_loss(p, chunk)).sum())(params)


def weighted_chunk_jvp(per_example_loss: Callable[[Params, Any], Tensor], params: Params, v: Params, chunk: Any,
                       w_c: Tensor) -> tuple[Params, Tensor]:
    """(∂g_c/∂θ · v, (∇ℓ_i · v)_{i∈c}) = (Σ_{i∈c} w_i ∇²ℓ_i v, vᵀ∂g_c/∂w_c): the JVP of θ ↦ (g_c, ℓ_c) in
    direction v, by forward-over-reverse (torch.func.jvp over torch.func.grad; the primal g_c and ℓ_c
    are recomputed alongside the tangents and discarded). By the symmetry of ∇²ℓ_i this is the VJP of
    g_c in the cotangent v, i.e. the MixFlow-MG backward of one chunk."""

    def weighted(p: Params) -> tuple[Tensor, Tensor]:
        losses = per_example_loss(p, chunk)
        return (w_c * losses).sum(), losses

    _, (hv, dl) = torch.func.jvp(lambda p: torch.func.grad(weighted, has_aux=True)(p), (params,), (v,))
    return hv, dl


@dataclass(frozen=True)
class MeanOuterLoss:
    """L_out(θ; b) = 1/|b| Σ_i ℓ_i(θ; b); its gradient is accumulated ``microbatch`` examples at a time."""

    per_example_loss: Callable[[Params, Any], Tensor]
    microbatch: int | None = None

    def __call__(self, params: Params, batch: Any) -> Tensor:
        return self.per_example_loss(params, batch).mean()

    def value_and_grad(self, params: Params, batch: Any) -> tuple[Tensor, Params]:
        n = batch_size(batch)
        total, grads = torch.zeros(()), None
        for a, b in _chunks(n, self.microbatch):
            p = tuple(t.detach().requires_grad_() for t in params)
            with torch.enable_grad():
                loss = self.per_example_loss(p, slice_batch(batch, a, b)).sum() / n
                g = torch.autograd.grad(loss, p, materialize_grads=True)
            total = total + loss.detach()
            grads = g if grads is None else tuple(x + y for x, y in zip(grads, g, strict=True))
        return total, grads


# --- one inner step, two ways of getting g_t ---------------------------------------------------


def _reverse_step(
    inner_loss: InnerLoss, opt: InnerOptimizer, params: Params, state: State, meta: Meta, batch: Any,
    create_graph: bool,
) -> tuple[Params, State]:
    """θ' = Υ(θ, ∇_θL_in(θ, η; b), s) with the gradient taken by reverse mode (params must require grad)."""
    loss = inner_loss(params, meta, batch)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, materialize_grads=True)
    return opt.update(params, grads, state)


class _MixFlowGrad(torch.autograd.Function):
    """g = ∇_θ L_in(θ, η; b); backward: (∇²_θθL·v, ∇²_ηθL·v) by forward-over-reverse (MixFlow-MG)."""

    @staticmethod
    def forward(ctx, inner_loss: InnerLoss, batch: Any, n_params: int, *tensors: Tensor):
        params, meta = tensors[:n_params], tensors[n_params:]
        with torch.enable_grad():
            p = tuple(t.detach().requires_grad_() for t in params)
            loss = inner_loss(p, tuple(m.detach() for m in meta), batch)
            grads = torch.autograd.grad(loss, p, materialize_grads=True)
        # Only the inputs are saved: no activation of the inner forward/backward survives this call.
        ctx.save_for_backward(*tensors)
        ctx.inner_loss, ctx.batch, ctx.n_params = inner_loss, batch, n_params
        return grads

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents: Tensor):
        saved = ctx.saved_tensors
        n = ctx.n_params
        params, meta = saved[:n], saved[n:]
        inner_loss, batch = ctx.inner_loss, ctx.batch
        want_meta = any(ctx.needs_input_grad[3 + n :])

        if want_meta:
            def grad_map(p: Params) -> tuple[Params, Meta]:
                return torch.func.grad(lambda p_, m_: inner_loss(p_, m_, batch), argnums=(0, 1))(p, meta)
        else:
            def grad_map(p: Params) -> Params:
                return torch.func.grad(lambda p_: inner_loss(p_, meta, batch))(p)

        _, tangent_out = torch.func.jvp(grad_map, (tuple(params),), (tuple(cotangents),))
        if want_meta:
            hv_params, hv_meta = tangent_out
        else:
            hv_params, hv_meta = tangent_out, (None,) * len(meta)
        if not any(ctx.needs_input_grad[3 : 3 + n]):
            hv_params = (None,) * n
        return (None, None, None, *hv_params, *hv_meta)


def mixflow_inner_grad(inner_loss: InnerLoss, params: Params, meta: Meta, batch: Any) -> Params:
    """∇_θ L_in(θ, η; b) whose VJP is computed by forward-over-reverse (MixFlow-MG, Kemaev et al. 2025)."""
    return _MixFlowGrad.apply(inner_loss, batch, len(params), *params, *meta)


class _MixFlowWeightedGrad(torch.autograd.Function):
    """g = Σ_i w_i ∇_θℓ_i(θ) in microbatches; backward: JVP of θ ↦ (Σ_{i∈c} w_i ∇ℓ_i, ℓ_c) per chunk c."""

    @staticmethod
    def forward(ctx, loss: WeightedInnerLoss, batch: Any, n_params: int, *tensors: Tensor):
        params, w = tensors[:n_params], tensors[n_params]
        grads = None
        for a, b in _chunks(w.shape[0], loss.microbatch):
            if loss.compile:
                g = loss.compiled[0](tuple(t.detach() for t in params), slice_batch(batch, a, b), w[a:b].detach())
            else:
                with torch.enable_grad():
                    p = tuple(t.detach().requires_grad_() for t in params)
                    lc = (w[a:b].detach() * loss.per_example_loss(p, slice_batch(batch, a, b))).sum()
                    g = torch.autograd.grad(lc, p, materialize_grads=True)
            grads = g if grads is None else tuple(x + y for x, y in zip(grads, g, strict=True))
        ctx.save_for_backward(*tensors)
        ctx.loss, ctx.batch, ctx.n_params = loss, batch, n_params
        return grads

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents: Tensor):
        saved = ctx.saved_tensors
        n, loss, batch = ctx.n_params, ctx.loss, ctx.batch
        params, w = tuple(saved[:n]), saved[n]
        hv, dw = None, []
        for a, b in _chunks(w.shape[0], loss.microbatch):
            chunk, w_c = slice_batch(batch, a, b), w[a:b]
            if loss.hvp == "reverse":
                with torch.enable_grad():
                    p = tuple(t.detach().requires_grad_() for t in params)
                    wc = w_c.detach().requires_grad_()
                    g = torch.autograd.grad((wc * loss.per_example_loss(p, chunk)).sum(), p, create_graph=True)
                    *hv_c, dl_c = torch.autograd.grad(g, (*p, wc), cotangents, materialize_grads=True)
                hv = tuple(hv_c) if hv is None else tuple(x + y for x, y in zip(hv, hv_c, strict=True))
                dw.append(dl_c)
                continue
            jvp = loss.compiled[1] if loss.compile else partial(weighted_chunk_jvp, loss.per_example_loss)
            hv_c, dl_c = jvp(params, tuple(cotangents), chunk, w_c)
            hv = hv_c if hv is None else tuple(x + y for x, y in zip(hv, hv_c, strict=True))
            dw.append(dl_c)
        if not any(ctx.needs_input_grad[3 : 3 + n]):
            hv = (None,) * n
        return (None, None, None, *hv, torch.cat(dw))


def _mixflow_step(
    inner_loss: InnerLoss, opt: InnerOptimizer, params: Params, state: State, meta: Meta, batch: Any,
    create_graph: bool,
) -> tuple[Params, State]:
    if isinstance(inner_loss, WeightedInnerLoss):
        w = inner_loss.weights(meta, batch)
        grads = _MixFlowWeightedGrad.apply(inner_loss, batch, len(params), *params, w)
    else:
        grads = mixflow_inner_grad(inner_loss, params, meta, batch)
    return opt.update(params, grads, state)


# --- rematerialised step -------------------------------------------------------------------------


class _RematStep(torch.autograd.Function):
    """One inner step that saves only (θ_t, s_t, η) and recomputes its graph in backward."""

    @staticmethod
    def forward(ctx, step_fn, inner_loss, opt, batch, n_params: int, n_state: int, *tensors: Tensor):
        with torch.enable_grad():
            p = tuple(t.detach().requires_grad_() for t in tensors[:n_params])
            rest = tuple(t.detach() for t in tensors[n_params:])
            new_p, new_s = step_fn(inner_loss, opt, p, rest[:n_state], rest[n_state:], batch, False)
        ctx.save_for_backward(*tensors)
        ctx.fns = (step_fn, inner_loss, opt, batch)
        ctx.sizes = (n_params, n_state)
        return tuple(t.detach() for t in (*new_p, *new_s))

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents: Tensor):
        step_fn, inner_loss, opt, batch = ctx.fns
        n_params, n_state = ctx.sizes
        with torch.enable_grad():
            inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors)
            p, s, m = inputs[:n_params], inputs[n_params : n_params + n_state], inputs[n_params + n_state :]
            new_p, new_s = step_fn(inner_loss, opt, p, s, m, batch, True)
            outs, cots = [], []
            for o, c in zip((*new_p, *new_s), cotangents, strict=True):
                if o.requires_grad:
                    outs.append(o)
                    cots.append(c)
            wanted = [x for x in inputs if x.requires_grad]
            grads = iter(torch.autograd.grad(outs, wanted, cots, allow_unused=True, materialize_grads=True))
        return (None,) * 6 + tuple(next(grads) if x.requires_grad else None for x in inputs)


# --- unroll and meta-gradient --------------------------------------------------------------------


def unroll(
    inner_loss: InnerLoss,
    optimizer: InnerOptimizer,
    params: Params,
    opt_state: State,
    meta: Meta,
    batches: Sequence[Any],
    engine: str = "mixflow",
) -> tuple[Params, State]:
    """T = len(batches) inner steps θ_{t+1} = Υ(θ_t, ∇_θL_in(θ_t, η; b_t), s_t), differentiable in η.

    ``params`` and ``opt_state`` are treated as constants (detached); gradients flow to ``meta``
    through the chosen engine's backward.
    """
    check_engine(engine)
    state = tuple(s.detach() for s in opt_state)
    if engine == "reverse":
        p = tuple(t.detach().requires_grad_() for t in params)
        for b in batches:
            p, state = _reverse_step(inner_loss, optimizer, p, state, meta, b, True)
        return p, state
    if engine == "mixflow":
        p = tuple(t.detach() for t in params)
        for b in batches:
            p, state = _mixflow_step(inner_loss, optimizer, p, state, meta, b, True)
        return p, state
    step_fn = _reverse_step if engine == "reverse_remat" else _mixflow_step
    p = tuple(t.detach() for t in params)
    n_p, n_s = len(p), len(state)
    for b in batches:
        out = _RematStep.apply(step_fn, inner_loss, optimizer, b, n_p, n_s, *p, *state, *meta)
        p, state = out[:n_p], out[n_p:]
    return p, state


@dataclass
class MetaGradient:
    """Result of one meta-gradient computation (all tensors detached)."""

    outer_loss: Tensor
    """L_out(θ_T; b_out)."""
    grads: Meta
    """dL_out/dη, one tensor per meta-parameter."""
    params: Params
    """θ_T (the inner model after the unroll)."""
    opt_state: State
    """s_T."""


def meta_gradient(
    inner_loss: InnerLoss,
    outer_loss: OuterLoss,
    optimizer: InnerOptimizer,
    params: Params,
    opt_state: State,
    meta: Meta,
    inner_batches: Sequence[Any],
    outer_batch: Any,
    engine: str = "mixflow",
) -> MetaGradient:
    """dL_out(θ_T(η))/dη through T = len(inner_batches) inner steps with the given engine.

    ``inner_loss`` may be a :class:`WeightedInnerLoss` and ``outer_loss`` a :class:`MeanOuterLoss`
    (both enable microbatching); any callables with the :data:`InnerLoss` / :data:`OuterLoss`
    signatures work with every engine.
    """
    meta_leaves = tuple(m.detach().requires_grad_() for m in meta)
    if not inner_batches:
        raise ValueError("meta_gradient needs at least one inner batch (T >= 1)")
    p_T, s_T = unroll(inner_loss, optimizer, params, opt_state, meta_leaves, inner_batches, engine)
    # The outer gradient g_T = ∇_θ L_out(θ_T) is taken first on a detached copy of θ_T, so the outer
    # model's activations are freed before the unroll's backward starts; then dL/dη = g_Tᵀ dθ_T/dη.
    p_det = tuple(t.detach() for t in p_T)
    if isinstance(outer_loss, MeanOuterLoss):
        loss, g_T = outer_loss.value_and_grad(p_det, outer_batch)
    else:
        p_det = tuple(t.requires_grad_() for t in p_det)
        with torch.enable_grad():
            loss = outer_loss(p_det, outer_batch)
            g_T = torch.autograd.grad(loss, p_det, materialize_grads=True)
    grads = torch.autograd.grad(p_T, meta_leaves, g_T, materialize_grads=True, allow_unused=True)
    return MetaGradient(
        outer_loss=loss.detach(),
        grads=tuple(g.detach() for g in grads),
        params=tuple(t.detach() for t in p_T),
        opt_state=tuple(t.detach() for t in s_T),
    )
