"""Fisher information of a Gaussian predictive model, for any torch module (EVE, Delta Variances).

Shape letters: B examples, K outputs per example, P parameters (flat layout of
:mod:`algorithms.uncertainty.params`).

Model (EVE, Schmitt et al. 2023, arXiv 2303.04012): a prediction u_θ(z) ∈ R^K is the mean of a Gaussian
density over targets, p_θ(y | z) = N(y; u_θ(z), σ² I) (for EVE, u = Q_θ(s, a) and y the return G).
Its Fisher information for one input is J_zᵀ J_z / σ² with J_z = ∂u_θ(z)/∂θ [K, P]; averaged over
inputs,

    F = (1/B) Σ_b J_bᵀ J_b / σ² = E_z[∇_θu ∇_θuᵀ] / σ²                      [P, P]

(the expectation over y of ∇log p ∇log pᵀ is taken in closed form, so no targets are needed). The
Laplace / EVE posterior over parameters is N(θ̂, (N·F + λ I)⁻¹) with N the number of data points and
λ the damping (a Gaussian prior's precision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from algorithms.uncertainty.fast import mean_sq_grad_fast_with_batch, named_params
from algorithms.uncertainty.jacobian import per_example_jacobian
from algorithms.uncertainty.params import Params, QueryFn, num_params
from algorithms.uncertainty.posterior import diagonal_posterior_precision

FISHER_MODES = ("ema", "mean")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def fisher_full(
    fn: QueryFn, params: Params, inputs: Tensor | Sequence[Tensor], noise_var: float = 1.0
) -> Tensor:
    """Exact Fisher F = (1/B) Σ_b J_bᵀ J_b / σ² [P, P] from per-example Jacobians (vmap + jacrev).

    For small models only: memory is O(B·K·P + P²). ``fn(params, *z)`` is the prediction u_θ(z) for one
    input (scalar or [K]); ``noise_var`` is σ².
    """
    _check_positive("noise_var", noise_var)
    jac, _ = per_example_jacobian(fn, params, inputs)
    batch = jac.shape[0]
    flat = jac.reshape(-1, jac.shape[-1])
    return flat.T @ flat / (batch * noise_var)


def fisher_diagonal(
    fn: QueryFn, params: Params, inputs: Tensor | Sequence[Tensor], noise_var: float = 1.0
) -> Tensor:
    """Diagonal of the Fisher, diag F_p = (1/B) Σ_b Σ_k J_{bkp}² / σ² [P] (one batch, no running average)."""
    _check_positive("noise_var", noise_var)
    jac, _ = per_example_jacobian(fn, params, inputs)
    return jac.square().sum(dim=(0, 1)) / (jac.shape[0] * noise_var)


class RunningDiagonalFisher:
    """A running estimate of diag F over a stream of batches, with damping λ (EVE's posterior precision).

    Each update takes the per-example Jacobians J [B, K, P] (or per-example gradients [B, P]) of one
    batch and forms the batch estimate

        f_t = (1/B_t) Σ_b Σ_k J_{bk}² / σ²                                                    [P]

    ``mode="ema"`` (exponential moving average, decay β, bias-corrected as in Adam):
        m_t = β m_{t-1} + (1 − β) f_t,   m_0 = 0,   F_t = m_t / (1 − β^t)
    ``mode="mean"`` (cumulative mean over all n_t = Σ B_t examples seen):
        m_t = m_{t-1} + (B_t / n_t)(f_t − m_{t-1}),   F_t = m_t

    Posterior (EVE, Schmitt et al. 2023): precision(N) = N·F_t + λ, covariance(N) = 1 / (N·F_t + λ)
    elementwise, with N the number of data points (EVE: transitions seen). Before any update F_0 = 0,
    so the covariance is the prior's, 1/λ.

    State is plain tensors and numbers: ``state_dict()`` / ``load_state_dict()`` round-trip through
    ``torch.save``.
    """

    def __init__(
        self,
        params: Params,
        *,
        damping: float,
        mode: str = "ema",
        decay: float = 0.999,
        noise_var: float = 1.0,
    ) -> None:
        if mode not in FISHER_MODES:
            raise ValueError(f"mode={mode!r} is not supported; allowed values: {FISHER_MODES}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        _check_positive("noise_var", noise_var)
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if not params:
            raise ValueError("params is empty: expected a dict {name: tensor} with at least one entry")
        first = next(iter(params.values()))
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.mode = mode
        self.decay = float(decay)
        self.noise_var = float(noise_var)
        self.damping = float(damping)
        self.moment = torch.zeros(num_params(params), dtype=first.dtype, device=first.device)
        self.steps = 0
        self.count = 0

    @property
    def num_params(self) -> int:
        return self.moment.numel()

    @property
    def fisher(self) -> Tensor:
        """F_t [P] (bias-corrected for ``mode="ema"``)."""
        if self.mode == "ema" and self.steps > 0:
            return self.moment / (1.0 - self.decay**self.steps)
        return self.moment

    def update(self, jacobian: Tensor) -> Tensor:
        """Fold one batch of per-example Jacobians [B, K, P] or gradients [B, P] in; returns F_t [P]."""
        if jacobian.dim() == 2:
            jacobian = jacobian.unsqueeze(1)
        if jacobian.dim() != 3 or jacobian.shape[-1] != self.num_params or jacobian.shape[0] == 0:
            raise ValueError(
                f"jacobian has shape {tuple(jacobian.shape)}; expected [B, {self.num_params}] or "
                f"[B, K, {self.num_params}] with B >= 1"
            )
        batch = jacobian.shape[0]
        return self.update_mean_sq_grad(jacobian.detach().square().sum(dim=(0, 1)) / batch, batch)

    def update_mean_sq_grad(self, mean_sq_grad: Tensor, batch_size: int) -> Tensor:
        """Fold in a batch given as (1/B) Σ_b Σ_k J_bk² [P] (so f_t = that / σ²) and its size B; returns F_t."""
        if mean_sq_grad.shape != (self.num_params,):
            raise ValueError(f"mean_sq_grad has shape {tuple(mean_sq_grad.shape)}; expected ({self.num_params},)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_fisher = mean_sq_grad.detach().to(self.moment) / self.noise_var
        self.steps += 1
        self.count += batch_size
        if self.mode == "ema":
            self.moment.mul_(self.decay).add_(batch_fisher, alpha=1.0 - self.decay)
        else:
            self.moment.add_(batch_fisher - self.moment, alpha=batch_size / self.count)
        return self.fisher

    def update_from_module(
        self, module: nn.Module, forward: Callable[[nn.Module], Tensor], *, retain_graph: bool = False
    ) -> Tensor:
        """:meth:`update` for MLPs via :func:`algorithms.uncertainty.fast.mean_sq_grad_fast` (no per-example
        gradients materialised); ``retain_graph`` keeps ``forward``'s graph for a loss on the same pass."""
        names = list(named_params(module, trainable_only=True))
        if names != self.names:
            raise ValueError(f"module parameters are {names}; this estimate was built for {self.names}")
        return self.update_mean_sq_grad(*mean_sq_grad_fast_with_batch(module, forward, retain_graph=retain_graph))

    def update_from(self, fn: QueryFn, params: Params, inputs: Tensor | Sequence[Tensor]) -> Tensor:
        """:meth:`update` with the Jacobians of ``fn(params, *z)`` on a batch of inputs (torch.func)."""
        if list(params) != self.names:
            raise ValueError(f"params have names {list(params)}; this estimate was built for {self.names}")
        jac, _ = per_example_jacobian(fn, params, inputs)
        return self.update(jac)

    def precision(self, num_data: float) -> Tensor:
        """N·F_t + λ [P] (:func:`~algorithms.uncertainty.posterior.diagonal_posterior_precision`)."""
        return diagonal_posterior_precision(self.fisher, num_data, self.damping, require_positive=False)

    def covariance(self, num_data: float) -> Tensor:
        """Diagonal posterior covariance 1 / (N·F_t + λ) [P] (needs λ > 0 or F_t > 0 everywhere)."""
        prec = self.precision(num_data)
        if not bool((prec > 0).all()):
            raise ValueError("N*F + damping has zero entries: use damping > 0")
        return prec.reciprocal()

    def posterior_std(self, num_data: float) -> Tensor:
        """(N·F_t + λ)^{-1/2} [P], the diagonal posterior std (= ``covariance(N).sqrt()``, fewer kernels: EVE
        draws a target perturbation with it every update)."""
        if num_data < 0:
            raise ValueError(f"num_data must be >= 0, got {num_data}")
        if self.damping <= 0:
            return self.covariance(num_data).sqrt()
        scale = num_data / (1.0 - self.decay**self.steps) if self.mode == "ema" and self.steps > 0 else num_data
        return torch.add(self.moment, self.damping / scale).mul_(scale).rsqrt_() if scale > 0 else \
            torch.full_like(self.moment, self.damping ** -0.5)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a [P] vector (e.g. :attr:`fisher`) into tensors by parameter name."""
        if vec.shape != (self.num_params,):
            raise ValueError(f"vec has shape {tuple(vec.shape)}; expected ({self.num_params},)")
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        return {n: v.reshape(s) for n, s, v in zip(self.names, self.shapes, vec.split(sizes), strict=True)}

    def to(self, device: torch.device | str) -> RunningDiagonalFisher:
        self.moment = self.moment.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "moment": self.moment.detach().clone(),
            "steps": self.steps,
            "count": self.count,
            "mode": self.mode,
            "decay": self.decay,
            "noise_var": self.noise_var,
            "damping": self.damping,
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("names", "shapes"):
            mine = self.names if key == "names" else [list(s) for s in self.shapes]
            if [list(x) if key == "shapes" else x for x in state[key]] != mine:
                raise ValueError(f"state[{key!r}] = {state[key]} does not match this estimate's {mine}")
        if state["mode"] not in FISHER_MODES:
            raise ValueError(f"state['mode']={state['mode']!r}; allowed values: {FISHER_MODES}")
        self.moment = state["moment"].detach().clone().to(self.moment)
        self.steps = int(state["steps"])
        self.count = int(state["count"])
        self.mode = state["mode"]
        self.decay = float(state["decay"])
        self.noise_var = float(state["noise_var"])
        self.damping = float(state["damping"])
