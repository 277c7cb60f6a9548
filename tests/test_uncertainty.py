"""Delta Variances, Fisher estimates and posterior sampling (algorithms/uncertainty) against closed forms,
independent Laplace computations and hand-computed values."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from algorithms.uncertainty import (
    RunningDiagonalFisher,
    delta_variance,
    delta_variance_fast,
    diagonal_posterior_covariance,
    diagonal_posterior_precision,
    fisher_diagonal,
    fisher_full,
    flatten_params,
    full_posterior_covariance,
    mean_sq_grad_fast,
    module_fn,
    module_params,
    per_example_jacobian,
    sample_posterior,
    unflatten_like,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra intra-op threads only contend for the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- Bayesian linear regression (closed form)


def _blr_problem():
    """y = x·w + b + noise, prior N(0, λ⁻¹ I) on (w, b), noise variance σ²."""
    g = torch.Generator().manual_seed(0)
    n, d, noise_var, prior_prec = 25, 3, 0.3, 0.5
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.7 + noise_var**0.5 * torch.randn(n, generator=g, dtype=F64)
    x1 = torch.cat([x, torch.ones(n, 1, dtype=F64)], dim=1)
    precision = x1.T @ x1 / noise_var + prior_prec * torch.eye(d + 1, dtype=F64)
    post_cov = torch.linalg.inv(precision)
    post_mean = post_cov @ x1.T @ y / noise_var
    params = {"w": post_mean[:d].clone(), "b": post_mean[d].clone()}  # b is 0-d on purpose
    queries = torch.randn(7, d, generator=g, dtype=F64)
    return x, y, noise_var, prior_prec, post_cov, params, queries


def _blr_fn(p, x):
    return x @ p["w"] + p["b"]


def _blr_closed_form_variance(post_cov, queries):
    q1 = torch.cat([queries, torch.ones(len(queries), 1, dtype=F64)], dim=1)
    return torch.stack([q @ post_cov @ q for q in q1])


def test_blr_delta_variance_equals_exact_posterior_predictive_variance():
    x, y, noise_var, prior_prec, post_cov, params, queries = _blr_problem()
    exact = _blr_closed_form_variance(post_cov, queries)

    # Σ = the closed-form posterior covariance
    got = delta_variance(_blr_fn, params, queries, post_cov)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0.0)

    # Σ = inverse Hessian of the negative log posterior, Hessian from autograd on a flat vector
    def neg_log_post(theta):
        resid = y - (x @ theta[:3] + theta[3])
        return 0.5 * (resid**2).sum() / noise_var + 0.5 * prior_prec * (theta**2).sum()

    hess = torch.autograd.functional.hessian(neg_log_post, flatten_params(params))
    got_h = delta_variance(_blr_fn, params, queries, torch.linalg.inv(hess))
    torch.testing.assert_close(got_h, exact, rtol=1e-6, atol=0.0)

    # Σ = (N·F + λ)⁻¹ from the exact Fisher: for a linear-Gaussian model this is the posterior itself
    fisher = fisher_full(_blr_fn, params, x, noise_var=noise_var)
    sigma = full_posterior_covariance(fisher, len(x), prior_prec)
    torch.testing.assert_close(sigma, post_cov, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(delta_variance(_blr_fn, params, queries, sigma), exact, rtol=1e-6, atol=0.0)


def test_blr_vector_output_covariance():
    """u(z) = [x·w + b, 2 x·w]: Cov = A S Aᵀ with A the (linear) map from θ to u."""
    _, _, _, _, post_cov, params, queries = _blr_problem()

    def fn(p, x):
        return torch.stack([x @ p["w"] + p["b"], 2.0 * (x @ p["w"])])

    got = delta_variance(fn, params, queries, post_cov)
    assert got.shape == (len(queries), 2, 2)
    for i, q in enumerate(queries):
        a = torch.stack([torch.cat([q, torch.ones(1, dtype=F64)]), torch.cat([2 * q, torch.zeros(1, dtype=F64)])])
        torch.testing.assert_close(got[i], a @ post_cov @ a.T, rtol=1e-9, atol=1e-12)
    diag = delta_variance(fn, params, queries, post_cov, output_covariance=False)
    torch.testing.assert_close(diag, torch.diagonal(got, dim1=1, dim2=2))


# ---------------------------------------------------------------- small MLP: independent Laplace estimate


def _mlp(out: int = 1) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, out)).to(F64)


def _mlp_flat(theta, x, out: int = 1):
    """The same network written independently on a flat parameter vector (nn.Sequential order)."""
    w1 = theta[0:8].reshape(4, 2)
    b1 = theta[8:12]
    w2 = theta[12 : 12 + 4 * out].reshape(out, 4)
    b2 = theta[12 + 4 * out : 12 + 5 * out]
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _grad_loop(theta, xs, out: int = 1):
    """Per-example Jacobians [B, out, P] with one autograd.grad call per example and output."""
    rows = []
    for x in xs:
        t = theta.detach().clone().requires_grad_(True)
        u = _mlp_flat(t, x, out)
        rows.append(torch.stack([torch.autograd.grad(u[k], t, retain_graph=True)[0] for k in range(out)]))
    return torch.stack(rows)


def test_mlp_delta_variance_matches_independent_laplace():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 2, generator=g, dtype=F64)
    y = torch.sin(2 * x[:, 0]) * x[:, 1] + 0.1 * torch.randn(30, generator=g, dtype=F64)
    noise_var, prior_prec = 0.05, 1.0
    model = _mlp()

    def neg_log_post_flat(theta):
        resid = y - _mlp_flat(theta, x)[:, 0]
        return 0.5 * (resid**2).sum() / noise_var + 0.5 * prior_prec * (theta**2).sum()

    theta = flatten_params(module_params(model)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = neg_log_post_flat(theta)
        loss.backward()
        return loss

    opt.step(closure)
    theta_map = theta.detach()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta_map, model.parameters())

    hess = torch.autograd.functional.hessian(neg_log_post_flat, theta_map)
    assert bool((torch.linalg.eigvalsh(hess) > 0).all()), "MAP Hessian must be positive definite"
    queries = torch.randn(6, 2, generator=g, dtype=F64) * 2
    jac = _grad_loop(theta_map, queries)[:, 0]  # [B, P]
    expected = torch.stack([j @ torch.linalg.solve(hess, j) for j in jac])

    params = module_params(model)
    fn = lambda p, q: module_fn(model)(p, q)[0]  # noqa: E731
    got = delta_variance(fn, params, queries, torch.linalg.inv(hess))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)

    # the same Σ as an operator, and chunked evaluation
    op = lambda v: torch.linalg.solve(hess, v.T).T  # noqa: E731
    torch.testing.assert_close(delta_variance(fn, params, queries, op, chunk_size=4), expected, rtol=1e-8, atol=1e-12)

    # a diagonal Σ: Σ_p J_p² d_p, and the same diagonal as a dict by parameter name
    d = 1.0 / torch.diagonal(hess)
    expected_diag = (jac**2 * d).sum(dim=1)
    torch.testing.assert_close(delta_variance(fn, params, queries, d), expected_diag, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        delta_variance(fn, params, queries, unflatten_like(d, params)), expected_diag, rtol=1e-10, atol=1e-14
    )


def test_exact_fisher_equals_python_loop_average_outer_product():
    model = _mlp(out=2)
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    noise_var = 0.4
    params = module_params(model)
    theta = flatten_params(params)
    expected = torch.zeros(len(theta), len(theta), dtype=F64)
    for jac_i in _grad_loop(theta, x, out=2):
        for k in range(2):
            expected += torch.outer(jac_i[k], jac_i[k])
    expected /= len(x) * noise_var

    got = fisher_full(module_fn(model), params, x, noise_var=noise_var)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fisher_diagonal(module_fn(model), params, x, noise_var), torch.diagonal(expected))


def test_per_example_jacobian_shapes_and_tuple_inputs():
    """Q(s, a) as a scalar with (s, a) inputs agrees with the diagonal of the vector Q(s) case."""
    torch.manual_seed(4)
    q_net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    params = module_params(q_net)
    p_total = sum(p.numel() for p in params.values())
    s = torch.randn(10, 3)
    a = torch.randint(0, 4, (10,))
    q_all = module_fn(q_net)

    q_sa = module_fn(q_net, indexed=True)  # Q(s, a)

    jac, scalar = per_example_jacobian(q_sa, params, (s, a))
    assert scalar and jac.shape == (10, 1, p_total)
    jac_v, scalar_v = per_example_jacobian(q_all, params, s)
    assert not scalar_v and jac_v.shape == (10, 4, p_total)
    torch.testing.assert_close(jac[:, 0], jac_v[torch.arange(10), a])

    cov = torch.rand(p_total) + 0.1
    var_sa = delta_variance(q_sa, params, (s, a), cov)
    var_all = delta_variance(q_all, params, s, cov, output_covariance=False)
    full_all = delta_variance(q_all, params, s, cov)
    assert var_sa.shape == (10,) and var_all.shape == (10, 4) and full_all.shape == (10, 4, 4)
    torch.testing.assert_close(var_sa, var_all[torch.arange(10), a])
    torch.testing.assert_close(var_all, torch.diagonal(full_all, dim1=1, dim2=2))
    torch.testing.assert_close(delta_variance(q_all, params, s, cov, chunk_size=3), full_all)


def test_bad_inputs_raise_clear_errors():
    model = _mlp()
    params = module_params(model)
    fn = module_fn(model)
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"covariance has shape \(3,\); expected \(17,\)"):
        delta_variance(fn, params, x, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"covariance matrix has shape"):
        delta_variance(fn, params, x, torch.eye(5, dtype=F64))
    with pytest.raises(ValueError, match="batch dim B"):
        delta_variance(lambda p, a, b: fn(p, a)[0], params, (x, x[:3]), torch.ones(17, dtype=F64))
    with pytest.raises(ValueError, match="allowed values"):
        RunningDiagonalFisher(params, damping=1.0, mode="median")
    with pytest.raises(ValueError, match="positive definite"):
        full_posterior_covariance(torch.zeros(3, 3), 10, 0.0)


# ---------------------------------------------------------------- running diagonal Fisher (hand-computed)


def _linear_fn(p, x):
    return x @ p["w"]  # per-example gradient wrt w is x


def test_running_diagonal_fisher_hand_computed():
    params = {"w": torch.zeros(2, dtype=F64)}
    batch1 = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=F64)  # mean x² = [5, 2]; / σ²=2 -> [2.5, 1]
    batch2 = torch.tensor([[0.0, 1.0]], dtype=F64)  # -> [0, 0.5]

    ema = RunningDiagonalFisher(params, damping=0.1, mode="ema", decay=0.5, noise_var=2.0)
    torch.testing.assert_close(ema.fisher, torch.zeros(2, dtype=F64))
    torch.testing.assert_close(ema.update_from(_linear_fn, params, batch1), torch.tensor([2.5, 1.0], dtype=F64))
    # m2 = 0.5*[1.25, 0.5] + 0.5*[0, 0.5] = [0.625, 0.5]; bias correction / (1 - 0.25)
    torch.testing.assert_close(ema.update_from(_linear_fn, params, batch2), torch.tensor([5 / 6, 2 / 3], dtype=F64))

    mean = RunningDiagonalFisher(params, damping=0.1, mode="mean", noise_var=2.0)
    mean.update_from(_linear_fn, params, batch1)
    mean.update_from(_linear_fn, params, batch2)
    # (2*[2.5, 1] + 1*[0, 0.5]) / 3
    torch.testing.assert_close(mean.fisher, torch.tensor([5 / 3, 5 / 6], dtype=F64))
    assert (mean.steps, mean.count) == (2, 3)
    torch.testing.assert_close(mean.precision(10), torch.tensor([50 / 3 + 0.1, 25 / 3 + 0.1], dtype=F64))
    torch.testing.assert_close(
        mean.covariance(10), diagonal_posterior_covariance(mean.fisher, 10, 0.1), rtol=1e-12, atol=0.0
    )

    # vector outputs sum over K: u = [x·w, 2 x·w] gives per-example Σ_k J_k² = 5 x²
    vec = RunningDiagonalFisher(params, damping=0.1, mode="mean", noise_var=2.0)
    vec.update_from(lambda p, x: torch.stack([x @ p["w"], 2 * x @ p["w"]]), params, batch1[:1])
    torch.testing.assert_close(vec.fisher, torch.tensor([2.5, 10.0], dtype=F64))

    # posterior std (N F + λ)^(-1/2): mean mode [50/3 + 0.1, 25/3 + 0.1]; ema mode with its bias correction
    torch.testing.assert_close(mean.posterior_std(10), torch.tensor([50 / 3 + 0.1, 25 / 3 + 0.1], dtype=F64) ** -0.5)
    torch.testing.assert_close(ema.posterior_std(4), torch.tensor([4 * 5 / 6 + 0.1, 4 * 2 / 3 + 0.1], dtype=F64) ** -0.5)

    # before any update the posterior is the prior 1/λ
    fresh = RunningDiagonalFisher(params, damping=0.1)
    torch.testing.assert_close(fresh.covariance(1000), torch.full((2,), 10.0, dtype=F64))
    torch.testing.assert_close(fresh.posterior_std(1000), torch.full((2,), 10.0**0.5, dtype=F64))
    torch.testing.assert_close(mean.posterior_std(0), torch.full((2,), 10.0**0.5, dtype=F64))


def test_running_fisher_state_dict_roundtrip_continues_identically():
    model = _mlp(out=2)
    params = module_params(model)
    fn = module_fn(model)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 2, generator=g, dtype=F64) for _ in range(4)]
    est = RunningDiagonalFisher(params, damping=1e-3, mode="ema", decay=0.9)
    for b in batches[:2]:
        est.update_from(fn, params, b)
    buf = io.BytesIO()
    torch.save(est.state_dict(), buf)
    buf.seek(0)
    restored = RunningDiagonalFisher(params, damping=1.0, mode="mean")
    restored.load_state_dict(torch.load(buf))
    for b in batches[2:]:
        est.update_from(fn, params, b)
        restored.update_from(fn, params, b)
    assert torch.equal(est.fisher, restored.fisher) and restored.damping == 1e-3 and restored.mode == "ema"
    assert set(est.unflatten(est.fisher)) == set(params)

    other = RunningDiagonalFisher({"w": torch.zeros(3)}, damping=1.0)
    with pytest.raises(ValueError, match="names"):
        other.load_state_dict(est.state_dict())


def test_fast_diagonal_matches_per_example_gradients_for_mlp_with_layernorm():
    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).to(F64)
    params = module_params(net)
    s = torch.randn(10, 3, dtype=F64)
    a = torch.randint(0, 4, (10,))
    # vector output (K = 4, one backward per output) and Q(s, a)
    expected = fisher_diagonal(module_fn(net), params, s)
    torch.testing.assert_close(mean_sq_grad_fast(net, lambda m: m(s)), expected, rtol=1e-10, atol=1e-14)
    expected_sa = fisher_diagonal(module_fn(net, indexed=True), params, (s, a))
    got_sa = mean_sq_grad_fast(net, lambda m: m(s).gather(1, a[:, None])[:, 0])
    torch.testing.assert_close(got_sa, expected_sa, rtol=1e-10, atol=1e-14)

    slow = RunningDiagonalFisher(params, damping=1e-2, mode="ema", decay=0.9, noise_var=0.5)
    fast = RunningDiagonalFisher(params, damping=1e-2, mode="ema", decay=0.9, noise_var=0.5)
    for _ in range(2):
        slow.update_from(module_fn(net, indexed=True), params, (s, a))
        fast.update_from_module(net, lambda m: m(s).gather(1, a[:, None])[:, 0])
    torch.testing.assert_close(fast.fisher, slow.fisher, rtol=1e-10, atol=1e-14)
    assert fast.count == slow.count == 20

    # Delta Variance with a diagonal Σ, scalar and vector outputs, flat or by name
    d = torch.rand(sum(p.numel() for p in params.values()), dtype=F64) + 0.1
    torch.testing.assert_close(
        delta_variance_fast(net, lambda m: m(s).gather(1, a[:, None])[:, 0], d),
        delta_variance(module_fn(net, indexed=True), params, (s, a), d), rtol=1e-10, atol=1e-14,
    )
    torch.testing.assert_close(
        delta_variance_fast(net, lambda m: m(s), unflatten_like(d, params)),
        delta_variance(module_fn(net), params, s, d, output_covariance=False), rtol=1e-10, atol=1e-14,
    )

    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"'0.weight' belongs to Conv1d"):
        mean_sq_grad_fast(conv, lambda m: m(torch.randn(4, 1, 3))[:, 0])
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="must run once"):
        mean_sq_grad_fast(shared, lambda m: m(m(torch.randn(4, 2))).sum(1))


# ---------------------------------------------------------------- posterior sampling


def test_sample_posterior_statistics_and_purity():
    params = {"a": torch.tensor([1.0, -2.0, 3.0], dtype=F64), "b": torch.zeros(2, 2, dtype=F64)}
    fisher = torch.tensor([0.1, 1.0, 4.0, 0.0, 0.5, 2.0, 0.02], dtype=F64)
    num_data, damping = 50.0, 0.5
    var = 1.0 / (num_data * fisher + damping)
    before = {k: v.clone() for k, v in params.items()}

    gen = torch.Generator().manual_seed(6)
    n = 4000
    samples = torch.stack([flatten_params(sample_posterior(params, fisher, num_data, damping, gen)) for _ in range(n)])
    for k in params:
        assert torch.equal(params[k], before[k]), "sample_posterior must not modify params"
    theta = flatten_params(params)
    # mean within 5 standard errors; variance within 5 sd of the sample variance (sd ≈ var·sqrt(2/n))
    assert bool(((samples.mean(0) - theta).abs() < 5 * (var / n).sqrt()).all())
    assert bool(((samples.var(0) / var - 1).abs() < 5 * (2 / n) ** 0.5).all())

    s1 = sample_posterior(params, fisher, num_data, damping, torch.Generator().manual_seed(7))
    s2 = sample_posterior(params, unflatten_like(fisher, params), num_data, damping, torch.Generator().manual_seed(7))
    s3 = sample_posterior(params, fisher, num_data, damping, torch.Generator().manual_seed(8))
    assert all(torch.equal(s1[k], s2[k]) for k in params)
    assert not all(torch.equal(s1[k], s3[k]) for k in params)
    assert s1["b"].shape == (2, 2) and s1["b"].dtype == F64
    zero = sample_posterior(params, fisher, num_data, damping, torch.Generator().manual_seed(7), scale=0.0)
    assert all(torch.equal(zero[k], params[k]) for k in params)


@pytest.mark.parametrize("norm", ["none", "layer", "rms"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "elu", "gelu"])
def test_linearised_forward_equals_torch_func_jvp(norm, activation):
    from algorithms.networks import NetworkConfig, build_mlp
    from algorithms.uncertainty.fast import linearised_forward

    torch.manual_seed(0)
    net = build_mlp(5, 3, NetworkConfig(hidden=[8, 6], norm=norm, activation=activation), seed=1).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    delta = torch.randn(sum(p.numel() for p in params.values()), dtype=torch.float64)
    y, dy = linearised_forward(net, x, delta)
    tangents = unflatten_like(delta, params)
    y_ref, dy_ref = torch.func.jvp(lambda p: torch.func.functional_call(net, p, (x,)), (params,), (tangents,))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)
    # first order: (f(θ + hδ) − f(θ − hδ)) / 2h = J δ + O(h²) (a one-sided difference's O(h) error
    # reached the tolerance for some random draws)
    h = 1e-6

    def at(sign: float) -> torch.Tensor:
        return torch.func.functional_call(net, {k: v + sign * h * tangents[k] for k, v in params.items()}, (x,))

    fd = (at(1.0) - at(-1.0)) / (2 * h)
    torch.testing.assert_close(fd, dy, rtol=1e-4, atol=1e-5)
    # a dict tangent and a module outside the fast path (torch.func.jvp fallback) agree
    torch.testing.assert_close(linearised_forward(net, x, tangents)[1], dy)
    wrapped = torch.nn.Sequential(torch.nn.Flatten(), net)
    torch.testing.assert_close(linearised_forward(wrapped, x, delta)[1], dy, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="entries"):
        linearised_forward(net, x, delta[:-1])


@pytest.mark.parametrize("hidden, norm", [([8], "layer"), ([8, 6], "none"), ([8, 6], "rms"), ([], "none")])
def test_fast_paths_of_grouped_networks_equal_per_example_gradients(hidden, norm, monkeypatch):
    """Grouped towers (algorithms.networks.grouped): the diagonal Fisher, the diagonal-Σ Delta Variance and
    J δ by the per-layer fast paths equal per-example gradients from torch.func, without the jvp fallback."""
    from algorithms.networks import NetworkConfig, build_grouped_mlp
    from algorithms.uncertainty.fast import linearised_forward

    net = build_grouped_mlp(5, 3, 2, NetworkConfig(hidden=hidden, norm=norm, activation="elu"), seed=2).double()
    params = module_params(net)
    s = torch.randn(7, 5, dtype=F64)
    a = torch.randint(0, 6, (7,))
    expected = fisher_diagonal(module_fn(net, indexed=True), params, (s, a))
    got = mean_sq_grad_fast(net, lambda m: m(s).gather(1, a[:, None])[:, 0])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    d = torch.rand(sum(p.numel() for p in params.values()), dtype=F64) + 0.1
    torch.testing.assert_close(delta_variance_fast(net, lambda m: m(s), d),
                               delta_variance(module_fn(net), params, s, d, output_covariance=False),
                               rtol=1e-10, atol=1e-14)
    jac = per_example_jacobian(module_fn(net), params, s)[0]  # [B, K, P]
    monkeypatch.setattr(torch.func, "jvp", lambda *args, **kw: pytest.fail("fell back to torch.func.jvp"))
    y, dy = linearised_forward(net, s, d)
    torch.testing.assert_close(y, net(s))
    torch.testing.assert_close(dy, jac @ d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("hidden, norm, activation", [([8], "layer", "elu"), ([8, 6], "none", "relu"),
                                                       ([7], "layer", "tanh"), ([], "none", "relu")])
def test_selected_output_reverse_pass_equals_autograd(grouped, hidden, norm, activation):
    """u_b = f(x)[b, i_b]: the hand-written reverse pass gives f(x), (1/B) Σ_b (∂u_b/∂θ)² and
    vjp(c) = Σ_b c_b ∂u_b/∂θ equal to per-example gradients (torch.func) and autograd's gradient of Σ_b c_b u_b;
    a module outside the chain takes the hooked autograd pass with the same values."""
    from algorithms.networks import NetworkConfig, build_grouped_mlp, build_mlp
    from algorithms.uncertainty.fast import _selected_terms, mean_sq_grad_fast_and_vjp_selected

    cfg = NetworkConfig(hidden=hidden, norm=norm, activation=activation)
    net = (build_grouped_mlp(5, 2, 2, cfg, seed=1) if grouped else build_mlp(5, 4, cfg, seed=1)).double()
    params = module_params(net)
    x = torch.randn(9, 5, dtype=F64)
    idx = torch.randint(0, 4, (9,))
    c = torch.randn(9, dtype=F64)
    assert _selected_terms(net, x, idx) is not None  # the hand-written path, not the fallback
    wrapped = nn.Sequential(nn.Flatten(), net)  # not a chain the reverse pass knows: autograd fallback
    assert _selected_terms(wrapped, x, idx) is None
    expected_fisher = fisher_diagonal(module_fn(net, indexed=True), params, (x, idx))
    net.zero_grad()
    (net(x).gather(1, idx[:, None]).squeeze(1) * c).sum().backward()
    for module in (net, wrapped):
        out, mean_sq, batch, vjp = mean_sq_grad_fast_and_vjp_selected(module, x, idx)
        assert batch == 9 and not out.requires_grad
        torch.testing.assert_close(out, net(x).detach())
        torch.testing.assert_close(mean_sq, expected_fisher, rtol=1e-10, atol=1e-14)
        grads = vjp(c)
        prefix = "1." if module is wrapped else ""
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[prefix + name], p.grad, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="weights must have shape"):
        vjp(c[:3])


def test_cached_structure_reads_parameters_live():
    """The fast paths cache each module's layer structure, not its parameters: weights changed in place
    or replaced by new Parameter objects after a first call are the ones used."""
    from algorithms.uncertainty.fast import linearised_forward, mean_sq_grad_fast

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    delta = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    linearised_forward(net, x, delta)
    mean_sq_grad_fast(net, lambda m: m(x)[:, 0])
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    net[2].weight = nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
    params = {k: v.detach() for k, v in net.named_parameters()}
    tangents = unflatten_like(delta, params)
    y_ref, dy_ref = torch.func.jvp(lambda p: torch.func.functional_call(net, p, (x,)), (params,), (tangents,))
    y, dy = linearised_forward(net, x, delta)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dy, dy_ref)
    jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(net(x[b:b + 1])[0, 0], list(net.parameters()))])
                       for b in range(5)])
    torch.testing.assert_close(mean_sq_grad_fast(net, lambda m: m(x)[:, 0]), jac.square().mean(0))


def test_diagonal_posterior_precision_by_hand_and_its_users_agree():
    """Λ = N·diag F + λ: F = (0.5, 0, 2), N = 4, λ = 0.1 gives (2.1, 0.1, 8.1); every user takes it from here."""
    from algorithms.eve.exploration import posterior_std

    fisher = torch.tensor([0.5, 0.0, 2.0], dtype=F64)
    expected = torch.tensor([2.1, 0.1, 8.1], dtype=F64)
    torch.testing.assert_close(diagonal_posterior_precision(fisher, 4, 0.1), expected)
    torch.testing.assert_close(diagonal_posterior_covariance(fisher, 4, 0.1), expected.reciprocal())
    torch.testing.assert_close(posterior_std(fisher, 4, 0.1), expected.rsqrt())
    with pytest.raises(ValueError, match="non-positive"):
        diagonal_posterior_precision(fisher, 4, 0.0)  # the zero Fisher entry and no prior
    torch.testing.assert_close(diagonal_posterior_precision(fisher, 4, 0.0, require_positive=False),
                               torch.tensor([2.0, 0.0, 8.0], dtype=F64))
    for bad in ({"num_data": -1, "damping": 0.1}, {"num_data": 4, "damping": -0.1}):
        with pytest.raises(ValueError, match="must be >= 0"):
            diagonal_posterior_precision(fisher, **bad)
