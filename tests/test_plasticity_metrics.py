"""Plasticity metrics against hand-computed and closed-form cases (algorithms/diagnostics/plasticity.py)."""

from __future__ import annotations

import math

import gymnasium as gym
import pytest
import torch
from torch import nn

from algorithms.diagnostics import plasticity as pm
from algorithms.diagnostics.probe import ProbeSet, collect_env_probe


def matrix_with_singular_values(s: list[float], n: int = 40, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Φ = U diag(s) Vᵀ with random orthonormal U [n, r], V [d, r]."""
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


# ---------------------------------------------------------------------------------------------------
# Rank measures


S = [10.0, 3.0, 1.0, 0.3, 0.1]


def test_singular_values_recovered():
    phi = matrix_with_singular_values(S)
    sv = pm.singular_values(phi)
    assert torch.allclose(sv[:5], torch.tensor(S, dtype=torch.float64), atol=1e-9)
    assert sv[5:].abs().max() < 1e-9


def test_effective_rank_hand_computed():
    phi = matrix_with_singular_values(S)
    total = sum(S)
    entropy = -sum((x / total) * math.log(x / total) for x in S)
    assert pm.effective_rank(phi) == pytest.approx(math.exp(entropy), rel=1e-8)


def test_srank_delta_001():
    # cumulative σ fractions: 10/14.4 = .694, 13/14.4 = .903, 14/14.4 = .972, 14.3/14.4 = .993 -> k = 4
    phi = matrix_with_singular_values(S)
    assert pm.srank(phi, delta=0.01) == 4
    # δ = 0.05: .972 >= .95 -> k = 3
    assert pm.srank(phi, delta=0.05) == 3


def test_stable_rank_is_frobenius_over_spectral():
    phi = matrix_with_singular_values(S)
    # (100 + 9 + 1 + .09 + .01) / 100
    assert pm.stable_rank(phi) == pytest.approx(110.1 / 100.0, rel=1e-9)
    assert pm.stable_rank(phi) == pytest.approx(float(phi.norm() ** 2 / torch.linalg.matrix_norm(phi, 2) ** 2))


def test_approximate_rank_99_percent_of_squared_sv():
    # squared: 100, 9, 1, .09, .01 (sum 110.1): k=1 .908, k=2 109/110.1 = .99001 -> 2
    phi = matrix_with_singular_values(S)
    assert pm.approximate_rank(phi) == 2


def test_rank_measures_equal_k_for_k_equal_singular_values():
    for k in (1, 3, 7):
        phi = matrix_with_singular_values([2.5] * k)
        m = pm.rank_metrics(phi)
        assert m["effective_rank"] == pytest.approx(k, rel=1e-9)
        assert m["stable_rank"] == pytest.approx(k, rel=1e-9)
        assert m["srank"] == k
        assert m["approximate_rank"] == k


def test_rank_measures_are_scale_invariant_and_zero_for_zero_matrix():
    phi = matrix_with_singular_values(S)
    a, b = pm.rank_metrics(phi), pm.rank_metrics(37.0 * phi)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9)
    zero = pm.rank_metrics(torch.zeros(5, 4))
    assert zero == {"effective_rank": 0.0, "srank": 0.0, "stable_rank": 0.0, "approximate_rank": 0.0}


def test_rank_bad_arguments():
    with pytest.raises(ValueError, match="delta"):
        pm.srank(torch.eye(3), delta=1.5)
    with pytest.raises(ValueError, match="threshold"):
        pm.approximate_rank(torch.eye(3), threshold=0.0)


# ---------------------------------------------------------------------------------------------------
# Dormant ratio


def handmade_activations() -> torch.Tensor:
    # Per-unit E_x|h| = [2, 1, 0.9, 0.05, 0]; layer mean 0.79 -> s = [2.53, 1.27, 1.14, 0.0633, 0].
    return torch.tensor(
        [
            [2.0, -1.0, 0.9, 0.1, 0.0],
            [-2.0, 1.0, 0.9, 0.0, 0.0],
        ]
    )


def test_dormant_scores_hand_computed():
    s = pm.dormant_scores(handmade_activations())
    expected = torch.tensor([2.0, 1.0, 0.9, 0.05, 0.0]) / 0.79
    assert torch.allclose(s, expected, atol=1e-6)


def test_dormant_ratio_thresholds():
    h = handmade_activations()
    assert pm.dormant_ratio(h, tau=0.0) == pytest.approx(1 / 5)  # dead: only the all-zero unit
    assert pm.dormant_ratio(h, tau=0.025) == pytest.approx(1 / 5)
    assert pm.dormant_ratio(h, tau=0.1) == pytest.approx(2 / 5)  # 0.0633 <= 0.1
    assert pm.dormant_ratio(h, tau=1.2) == pytest.approx(3 / 5)  # all but s = 2.53, 1.27


def test_dormant_ratio_pools_units_over_layers_and_conv_channels():
    h1 = handmade_activations()  # 1 of 5 dormant at τ = 0.025
    h2 = torch.zeros(2, 3)
    h2[:, 0] = 1.0  # s = [3, 0, 0]: 2 of 3 dormant
    assert pm.dormant_ratio([h1, h2], tau=0.025) == pytest.approx(3 / 8)
    # Conv map [N, C, H, W]: a channel is a unit, averaged over positions.
    conv = torch.zeros(2, 2, 3, 3)
    conv[:, 0] = 1.0
    conv[0, 1, 0, 0] = 0.009  # channel 1: E|h| = 0.0005, layer mean 0.50025 -> s = 0.001
    assert pm.dormant_ratio(conv, tau=0.025) == pytest.approx(1 / 2)
    assert pm.dormant_ratio(conv, tau=0.0) == 0.0
    with pytest.raises(ValueError, match="tau"):
        pm.dormant_ratio(conv, tau=-1)


# ---------------------------------------------------------------------------------------------------
# Norms, drift, effective learning rate


def test_gradient_norms_tiny_linear_model_by_hand():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    x = torch.tensor([[3.0, -1.0]])
    loss = 0.5 * (model(x) - 0.0).pow(2).sum()  # prediction 1.5 -> dL/dw = 1.5·x, dL/db = 1.5
    loss.backward()
    l1, l2 = pm.gradient_norms(model.weight.grad)
    assert l1 == pytest.approx(4.5 + 1.5)
    assert l2 == pytest.approx(math.sqrt(4.5**2 + 1.5**2))
    assert pm.weight_norm(model.weight) == pytest.approx(math.sqrt(5.0))


def test_feature_norm_and_drifts_hand_computed():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    assert pm.feature_norm(a) == pytest.approx((5.0 + 0.0) / 2)
    assert pm.feature_drift(a, b) == pytest.approx((5.0 + 10.0) / 2)
    p1 = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    p0 = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0])}
    assert pm.parameter_drift(p1, p0) == pytest.approx(math.sqrt(4.0 + 1.0))
    with pytest.raises(ValueError, match="names"):
        pm.parameter_drift(p1, {"w": p0["w"]})


def test_effective_learning_rate_closed_form_and_measured_sgd_step():
    assert pm.effective_learning_rate(0.1, 2.0, "sgd") == pytest.approx(0.1 / 4.0)
    assert pm.effective_learning_rate(0.1, 2.0, "adam") == pytest.approx(0.1 / 2.0)
    with pytest.raises(ValueError, match="sgd"):
        pm.effective_learning_rate(0.1, 2.0, "rmsprop")
    # A scale-invariant layer (Linear -> LayerNorm without affine) trained by one SGD step.
    torch.manual_seed(0)
    layer, norm = nn.Linear(6, 8, bias=False), nn.LayerNorm(8, elementwise_affine=False)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # a large norm, as after norm growth
    x, y = torch.randn(32, 6), torch.randn(32, 8)
    lr = 0.3
    w0 = layer.weight.detach().clone()
    loss = (norm(layer(x)) - y).pow(2).mean()
    loss.backward()
    g = layer.weight.grad.detach().clone()
    assert abs(float((g * w0).sum())) < 1e-4 * float(g.norm() * w0.norm())  # gradient ⟂ w
    torch.optim.SGD(layer.parameters(), lr=lr).step()
    measured = pm.measured_effective_learning_rate(w0, layer.weight, g)
    assert measured == pytest.approx(pm.effective_learning_rate(lr, float(w0.norm()), "sgd"), rel=1e-6)


def test_hessian_top_eigenvalue_of_quadratic():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([5.0, 2.0, -1.0, 0.5], dtype=torch.float64)) @ q.T
    x = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def loss():
        return 0.5 * x @ a @ x

    v = torch.randn(4, generator=g, dtype=torch.float64)
    (hv,) = pm.hessian_vector_product(loss, [x], [v])
    assert torch.allclose(hv, a @ v, atol=1e-12)
    lam = pm.hessian_top_eigenvalue(loss, [x], iters=200, tol=1e-10, generator=g)
    assert lam == pytest.approx(5.0, rel=1e-6)


def test_hessian_top_eigenvalue_over_module_parameters():
    # Least squares 0.5·mean((Xw - y)^2) has Hessian XᵀX / N whatever the bias-free weights are.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.randn(50, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    lam = pm.hessian_top_eigenvalue(lambda: 0.5 * (model(x) - y).pow(2).mean(), list(model.parameters()),
                                    iters=300, tol=1e-12, generator=g)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(x.T @ x / 50).max()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Finding layers


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 4)
        self.act = nn.ReLU()  # used twice: only the first call counts

    def forward(self, x):
        return self.b(self.act(self.b(self.act(self.a(x)))))


def test_capture_activations_names_and_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.Tanh())
    x = torch.randn(7, 3)
    acts = pm.capture_activations(net, lambda: net(x))
    assert list(acts) == ["1", "3"]
    assert torch.allclose(acts["1"], torch.relu(net[0](x)))
    assert torch.allclose(acts["3"], net(x))
    shared = SharedReLU()
    acts = pm.capture_activations(shared, lambda: shared(x))
    assert list(acts) == ["act"]
    assert torch.allclose(acts["act"], torch.relu(shared.a(x)))
    # hooks are removed afterwards
    assert not any(m._forward_hooks for m in shared.modules())


def test_weight_and_normalised_layers():
    net = nn.Sequential(nn.Linear(3, 5, bias=False), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2))
    assert list(pm.weight_layers(net)) == ["0", "3"]
    assert pm.normalised_layers(net) == ["0"]


# ---------------------------------------------------------------------------------------------------
# Probe set


def test_probe_set_collect_is_deterministic_extends_and_round_trips(tmp_path):
    env = gym.make("CartPole-v1")
    a = collect_env_probe(env, 64, seed=3)
    b = collect_env_probe(env, 100, seed=3)
    c = collect_env_probe(env, 64, seed=4)
    env.close()
    assert a.obs.shape == (64, 4) and a.obs.dtype == torch.float32
    assert torch.equal(a.obs, b.obs[:64])  # a longer collection extends a shorter one
    assert not torch.equal(a.obs, c.obs)
    path = a.save(tmp_path / "probe.npz")
    loaded = ProbeSet.load(path)
    assert torch.equal(loaded.obs, a.obs) and loaded.seed == 3
    assert torch.equal(ProbeSet.from_state_dict(a.state_dict()).obs, a.obs)
    assert len(a.head(10)) == 10


class DeclaresNormalised(nn.Module):
    """A block that is not an nn.Sequential and declares its normalised layer itself."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 4, bias=False)
        self.norm = nn.LayerNorm(4)
        self.act = nn.ReLU()

    def normalised_layers(self) -> list[str]:
        return ["layer"]


def test_normalised_layers_declared_by_nested_modules():
    outer = nn.ModuleDict({"torso": DeclaresNormalised(),
                           "head": nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 1))})
    assert sorted(pm.normalised_layers(outer)) == ["head.0", "torso.layer"]


def test_weight_layers_skip_frozen_weights():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    net[2].weight.requires_grad_(False)
    assert list(pm.weight_layers(net)) == ["0"]
    assert list(pm.weight_layers(net, trainable_only=False)) == ["0", "2"]
