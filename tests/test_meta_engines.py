"""Meta-gradient engines: closed form, agreement across engines, gradcheck, what each engine saves."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from torch import nn

from algorithms.datarater.models import (
    MLP,
    ByteTransformer,
    classification_per_example_loss,
    lm_per_example_loss,
)
from algorithms.datarater.objective import Batch, make_inner_loss, make_outer_loss
from algorithms.meta import ENGINES, SGD, Adam, make_inner_optimizer, meta_gradient, param_tuple, unroll
from algorithms.meta.functional import functional

DT = torch.float64


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_closed_form_one_sgd_step():
    """L_in = ½η(θ−a)², L_out = ½(θ−c)²; θ₁ = θ₀ − αη(θ₀−a)  ⇒  dL_out/dη = −α(θ₁−c)(θ₀−a)."""
    a, c, alpha, theta0, eta = 1.5, -0.5, 0.3, 2.0, 0.7

    def inner(p, m, b):
        return 0.5 * m[0] * (p[0] - a).pow(2).sum()

    def outer(p, b):
        return 0.5 * (p[0] - c).pow(2).sum()

    theta1 = theta0 - alpha * eta * (theta0 - a)
    expected = -alpha * (theta1 - c) * (theta0 - a)
    th, me = (torch.tensor([theta0], dtype=DT),), (torch.tensor(eta, dtype=DT),)
    for engine in ENGINES:
        r = meta_gradient(inner, outer, SGD(alpha), th, (), me, [None], None, engine)
        assert r.grads[0].item() == pytest.approx(expected, rel=1e-12), engine
        assert r.outer_loss.item() == pytest.approx(0.5 * (theta1 - c) ** 2, rel=1e-12)


def test_adam_matches_torch_adam():
    torch.manual_seed(0)
    p = torch.randn(5, 3, dtype=DT)
    ref = p.clone().requires_grad_()
    torch_opt = torch.optim.Adam([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    ours = Adam(lr=0.01, b1=0.8, b2=0.99, eps=1e-6, eps_root=0.0)
    params, state = (p,), ours.init((p,))
    for _ in range(4):
        g = torch.randn(5, 3, dtype=DT)
        ref.grad = g.clone()
        torch_opt.step()
        params, state = ours.update(params, (g,), state)
    torch.testing.assert_close(params[0], ref.detach(), rtol=1e-12, atol=1e-12)


def test_bad_engine_and_optimizer_names():
    with pytest.raises(ValueError, match="engine='fast'.*reverse, reverse_remat, mixflow"):
        unroll(lambda p, m, b: p[0].sum(), SGD(0.1), (torch.zeros(1),), (), (), [None], "fast")
    with pytest.raises(ValueError, match="name='rmsprop'.*'sgd', 'adam'"):
        make_inner_optimizer("rmsprop", 0.1)


def _mlp_problem(seed: int, microbatch: int | None = None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(5, (8, 8), 3, "tanh").to(DT)
    rater = MLP(5 + 3, (6,), 1, "tanh").to(DT)
    f_model, f_rater = functional(model), functional(rater)

    def batch():
        x = torch.randn(7, 5, generator=g, dtype=DT)
        y = torch.randint(0, 3, (7,), generator=g)
        return Batch(x, y, torch.cat([x, nn.functional.one_hot(y, 3).to(DT)], 1))

    inner = make_inner_loss(f_model, lambda m, r: f_rater(m, r).squeeze(-1), classification_per_example_loss,
                            microbatch)
    outer = make_outer_loss(f_model, classification_per_example_loss, microbatch)
    return inner, outer, param_tuple(model), param_tuple(rater), batch


def _lm_problem(seed: int, microbatch: int | None = None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lm = ByteTransformer(d_model=8, n_heads=2, n_layers=1, d_ff=16, max_len=6).to(DT)
    rater = ByteTransformer(d_model=4, n_heads=1, n_layers=1, d_ff=8, max_len=6, causal=False,
                            pooled_score=True).to(DT)

    def batch():
        t = torch.randint(0, 256, (4, 6), generator=g)
        return Batch(t, t, t)

    inner = make_inner_loss(functional(lm), functional(rater), lm_per_example_loss, microbatch)
    outer = make_outer_loss(functional(lm), lm_per_example_loss, microbatch)
    return inner, outer, param_tuple(lm), param_tuple(rater), batch


@pytest.mark.parametrize("problem", ["mlp", "transformer"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_engines_agree(problem, opt_name, T):
    build = _mlp_problem if problem == "mlp" else _lm_problem
    inner, outer, theta, eta, batch = build(seed=10 * T + (opt_name == "adam"))
    opt = make_inner_optimizer(opt_name, 0.5 if opt_name == "sgd" else 0.05)
    batches, out_batch = [batch() for _ in range(T)], batch()
    results = {e: meta_gradient(inner, outer, opt, theta, opt.init(theta), eta, batches, out_batch, e)
               for e in ENGINES}
    # Microbatched MixFlow (uneven chunks of 3) must give the same numbers.
    inner_mb, outer_mb, *_ = build(seed=10 * T + (opt_name == "adam"), microbatch=3)
    for e in ("mixflow", "mixflow_remat"):
        results[e + "_mb3"] = meta_gradient(inner_mb, outer_mb, opt, theta, opt.init(theta), eta, batches,
                                            out_batch, e)
    # The same MixFlow structure with its products by reverse-over-reverse on the recomputed chunk.
    results["mixflow_hvp_reverse_mb3"] = meta_gradient(
        dataclasses.replace(inner_mb, hvp="reverse"), outer_mb, opt, theta, opt.init(theta), eta, batches,
        out_batch, "mixflow")
    # A plain callable (no per-example structure) goes through the generic MixFlow gradient wrapper.
    results["mixflow_generic"] = meta_gradient(
        lambda p, m, b: inner(p, m, b), lambda p, b: outer(p, b), opt, theta, opt.init(theta), eta, batches,
        out_batch, "mixflow")
    ref = flat(results["reverse"].grads)
    assert ref.norm() > 1e-6  # a real, non-trivial meta-gradient
    for e, r in results.items():
        rel = (flat(r.grads) - ref).norm() / ref.norm()
        assert rel < 1e-8, f"{e}: relative difference {rel:.3g}"
        torch.testing.assert_close(flat(r.params), flat(results["reverse"].params), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
def test_gradcheck_tiny(engine):
    inner, outer, theta, eta, batch = _mlp_problem(seed=3)
    opt = Adam(lr=0.05)
    batches, out_batch = [batch(), batch()], batch()
    eta = tuple(e.clone().requires_grad_() for e in eta)

    def f(*meta):
        p_T, _ = unroll(inner, opt, theta, opt.init(theta), meta, batches, engine)
        return outer(p_T, out_batch)

    assert torch.autograd.gradcheck(f, eta, eps=1e-6, atol=1e-7, rtol=1e-5)


class _Packed:
    """A saved tensor held by the autograd graph; ``live[0]`` counts the bytes of those still held."""

    def __init__(self, t: torch.Tensor, live: list[int]):
        self.t, self.live, self.nbytes = t, live, t.numel() * t.element_size()
        live[0] += self.nbytes

    def __del__(self):
        self.live[0] -= self.nbytes


def test_saved_tensors_per_step():
    """After the unroll, mixflow(_remat) and reverse_remat hold O(|θ|+|η|) saved bytes per inner step
    (transients of the inner forward/backward are gone); reverse holds all inner graphs."""
    inner, outer, theta, eta, batch = _lm_problem(seed=5)
    opt = SGD(0.1)
    T = 4
    batches = [batch() for _ in range(T)]
    held: dict[str, int] = {}
    for engine in ENGINES:
        live = [0]
        meta = tuple(e.clone().requires_grad_() for e in eta)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, live=live: _Packed(t, live), lambda p: p.t):
            out = unroll(inner, opt, theta, opt.init(theta), meta, batches, engine)
        held[engine] = live[0]
        del out
        gc.collect()
        if engine.endswith("_remat"):
            # (Ops that save their own output, e.g. softmax in the rater graph that reverse and mixflow
            # keep, form a node -> packed tensor -> node cycle through the hook that Python's gc cannot
            # see; the remat engines keep only their custom Functions' inputs, so check those.)
            assert live[0] == 0, engine  # freeing the outputs frees the graph
    per_step = sum(t.numel() * t.element_size() for t in (*theta, *eta))
    for engine in ("mixflow_remat", "reverse_remat"):
        assert 0 < held[engine] <= T * per_step, (engine, held[engine], per_step)
    # Plain mixflow also keeps the rater's graph η -> softmax weights per step (small, rater-sized).
    assert held["mixflow"] <= 2 * T * per_step, (held["mixflow"], per_step)
    assert held["reverse"] > 3 * held["mixflow"], held


@pytest.mark.slow  # inductor compilation: ~1 min on a loaded 2-core machine
def test_mixflow_compiled_matches_reverse():
    """WeightedInnerLoss(compile=True): the torch.compile'd chunk gradient and chunk JVP give reverse
    mode's meta-gradient (transformer, SGD, T = 2, chunks of 2). (hvp="reverse" compiles only the chunk
    gradient, which this case runs as well.)"""
    hvp = "forward"
    inner, outer, theta, eta, batch = _lm_problem(seed=7, microbatch=2)
    opt = SGD(0.5)
    batches, out_batch = [batch(), batch()], batch()
    ref = meta_gradient(inner, outer, opt, theta, (), eta, batches, out_batch, "reverse")
    compiled = dataclasses.replace(inner, compile=True, hvp=hvp)
    for engine in ("mixflow", "mixflow_remat"):
        r = meta_gradient(compiled, outer, opt, theta, (), eta, batches, out_batch, engine)
        rel = (flat(r.grads) - flat(ref.grads)).norm() / flat(ref.grads).norm()
        assert rel < 1e-8, f"{engine}: relative difference {rel:.3g}"
        torch.testing.assert_close(flat(r.params), flat(ref.params), rtol=1e-9, atol=1e-9)
    assert "compiled" in compiled.__dict__  # the compiled path ran (fullgraph: no silent eager fallback)
