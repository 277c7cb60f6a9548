"""Exploration for EVE's epistemic Q-learning and its epsilon-greedy baseline (framework-free).

Shape letters: E parallel envs on one env runner, A actions, D observation size, P parameters.

Posterior sampling (EVE, Schmitt et al. 2023, arXiv 2303.04012; Thompson 1933): each env e holds a
sample from the diagonal Laplace posterior

    θ̃_e = θ̂ + scale · (N·diag F + λ)^{-1/2} ⊙ ε_e,    ε_e ~ N(0, I) from the runner's seeded generator,

drawn when its episode starts (``resample="episode"``) or every k env steps (``resample="steps"``), and
acts greedily on Q_θ̃_e. With ``perturbation="linearised"`` (default) Q_θ̃_e is taken to first order,
Q_θ̂(s) + ∇_θQ_θ̂(s)ᵀ(θ̃_e − θ̂) (one forward-mode pass): Gaussian around Q_θ̂ with the Delta Variance as its
variance, the linearised-Laplace reading of the posterior. ``perturbation="parameters"`` evaluates the
network at θ̃_e itself; for ReLU networks that also shifts Q's mean at uncertain states by an
action-dependent, episode-independent amount, which on deep_sea fixed an arbitrary action per rarely
visited state instead of exploring. A sample stays fixed until its next draw (deep, temporally consistent
exploration); θ̂, diag F and N are those of the latest weights the runner received when it draws.
With scale = 0 (or a zero-variance posterior) θ̃ = θ̂ and the actions are greedy on θ̂.

Epsilon-greedy (the baseline): with probability ε a uniformly random action, else argmax_a Q_θ̂(s, a),
ε annealed linearly from ``initial`` to ``final`` over ``timesteps`` env steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from algorithms.uncertainty import Params, diagonal_posterior_precision, flatten_params, unflatten_like

RESAMPLE_MODES = ("episode", "steps")
PERTURBATION_MODES = ("linearised", "parameters")


def greedy_actions(q_values: Tensor) -> Tensor:
    """argmax_a Q(s_e, a) [E] from Q [E, A] (ties go to the lowest index)."""
    return q_values.argmax(dim=-1)


def epsilon_greedy_actions(q_values: Tensor, epsilon: float, generator: torch.Generator) -> Tensor:
    """ε-greedy actions [E]: uniform over A with probability ε, else greedy (draws from ``generator``)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    num_envs, num_actions = q_values.shape
    explore = torch.rand(num_envs, generator=generator) < epsilon
    random = torch.randint(num_actions, (num_envs,), generator=generator)
    return torch.where(explore, random.to(q_values.device), greedy_actions(q_values))


def linear_epsilon(step: int, initial: float, final: float, timesteps: int) -> float:
    """ε(t) = initial + (final − initial) · min(1, t / T), T = ``timesteps`` (T = 0: always final)."""
    if timesteps <= 0:
        return float(final)
    frac = min(1.0, max(0, step) / timesteps)
    return float(initial + (final - initial) * frac)


def posterior_std(fisher_diag: Tensor, num_data: float, damping: float) -> Tensor:
    """(N·diag F + λ)^{-1/2} [P], the diagonal posterior std (λ > 0 keeps it finite)."""
    return diagonal_posterior_precision(fisher_diag, num_data, damping).rsqrt()


def perturbed_q_values(
    q_fn: Callable[[Params, Tensor], Tensor], like: Params, theta_samples: Tensor, obs: Tensor
) -> Tensor:
    """Q_θ̃_e(s_e) [E, A]: env e's observation s_e [E, D] through its own flat parameter sample θ̃_e [E, P].

    ``q_fn(params, s)`` evaluates ONE unbatched observation; ``like`` gives the parameter names/shapes."""
    if theta_samples.shape[0] != obs.shape[0]:
        raise ValueError(f"theta_samples {tuple(theta_samples.shape)} and obs {tuple(obs.shape)} disagree on E")

    def one(flat: Tensor, s: Tensor) -> Tensor:
        return q_fn(unflatten_like(flat, like), s)

    return torch.func.vmap(one)(theta_samples, obs)


class PosteriorExplorer:
    """Per-env Thompson samples of the Q network's parameters, resampled per episode or every k steps.

    Stateful but framework-free: an env runner calls :meth:`set_posterior` when weights arrive,
    :meth:`act` every step and :meth:`episode_started` when envs reset. Draws come from a CPU
    ``torch.Generator`` seeded with ``seed``, in env order, so a seed fixes every sample.

    Acting runs a plain batched forward pass of one copy of ``network`` per env holding that env's
    sample (written at each draw), so a step costs what a greedy step costs.

    Args:
        network: the Q network (obs [B, D] -> Q [B, A]); copied, never modified.
        num_envs: E.
        seed: generator seed (give each env runner its own).
        resample: "episode" (a new sample when an env's episode starts) or "steps" (every ``every`` steps).
        every: k for ``resample="steps"``.
        scale: multiplies the posterior std (1 = the posterior, 0 = greedy on θ̂).
        perturbation: "linearised" (first order in θ̃ − θ̂) or "parameters" (the network at θ̃).
    """

    def __init__(
        self,
        network: nn.Module,
        num_envs: int,
        *,
        seed: int,
        resample: str = "episode",
        every: int = 1,
        scale: float = 1.0,
        perturbation: str = "linearised",
    ) -> None:
        if perturbation not in PERTURBATION_MODES:
            raise ValueError(f"perturbation={perturbation!r} is not supported; allowed values: {PERTURBATION_MODES}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample={resample!r} is not supported; allowed values: {RESAMPLE_MODES}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.perturbation = perturbation
        copies = num_envs if perturbation == "parameters" else 1  # linearised: one copy holding θ̂
        self.copies = [copy.deepcopy(network).requires_grad_(False) for _ in range(copies)]
        self.num_envs = num_envs
        self.resample = resample
        self.every = every
        self.scale = float(scale)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.like: Params | None = None
        self._posterior: tuple[Tensor, float, float] | None = None  # (diag F, N, λ) of the latest weights
        self._theta: Tensor | None = None  # flat θ̂ and the posterior std, computed when first needed
        self._std: Tensor | None = None
        self.deltas: Tensor | None = None  # [E, P]: each env's drawn perturbation θ̃_e − θ̂
        self._delta_views: list[Params] | None = None  # deltas[e] by parameter name (views, so draws show)
        self.steps_since = torch.zeros(num_envs, dtype=torch.int64)
        self.pending = torch.ones(num_envs, dtype=torch.bool)  # envs that draw before their next action
        self.num_samples = 0

    @property
    def samples(self) -> Tensor | None:
        """θ̃_e = θ̂ + δ_e [E, P]: the drawn perturbations around the latest θ̂."""
        return None if self.deltas is None else self.theta + self.deltas

    @property
    def theta(self) -> Tensor | None:
        """θ̂ flat [P] (None before :meth:`set_posterior`)."""
        if self._theta is None and self.like is not None:
            self._theta = flatten_params(self.like)
        return self._theta

    @property
    def std(self) -> Tensor | None:
        """scale · (N·diag F + λ)^{-1/2} [P] of the latest posterior (None before :meth:`set_posterior`)."""
        if self._std is None and self._posterior is not None:
            fisher_diag, num_data, damping = self._posterior
            self._std = self.scale * posterior_std(fisher_diag.to(self.theta), num_data, damping)
        return self._std

    def set_posterior(self, params: Params, fisher_diag: Tensor, num_data: float, damping: float) -> None:
        """New θ̂ (by name), diag F [P], N and λ. Perturbations already drawn stay until their next draw
        (the std of new draws follows the new posterior); they apply around the new θ̂. The flat θ̂ and the
        std are computed at the next draw (runners receive weights far more often than episodes start), so
        ``fisher_diag`` must not change in place before then (the runner's module buffer changes only when
        the next weights arrive, which calls this again)."""
        self.like = {k: v.detach() for k, v in params.items()}
        self._posterior = (fisher_diag, float(num_data), float(damping))
        self._theta = self._std = None
        if self.deltas is None:
            first = next(iter(self.like.values()))
            self.deltas = torch.zeros(self.num_envs, sum(v.numel() for v in self.like.values()), dtype=first.dtype)
            self._delta_views = None
        self._write_copies()

    def _write_copies(self) -> None:
        if self.perturbation == "linearised":
            with torch.no_grad():  # θ̂ tensor by tensor (no flat copy)
                for p, value in zip(self.copies[0].parameters(), self.like.values(), strict=True):
                    p.copy_(value)
        else:
            for e, net in enumerate(self.copies):
                torch.nn.utils.vector_to_parameters(self.theta + self.deltas[e], net.parameters())

    def episode_started(self, envs: Tensor | None = None) -> None:
        """Envs whose episode (re)starts (bool mask [E]; all when None): they draw before acting."""
        mask = torch.ones(self.num_envs, dtype=torch.bool) if envs is None else envs.to(torch.bool).cpu()
        if self.resample == "episode":
            self.pending |= mask

    def _draw(self, envs: Tensor) -> None:
        idx = envs.nonzero().squeeze(1)
        for e in idx.tolist():  # env order keeps the generator stream fixed by the seed
            eps = torch.randn(self.theta.numel(), generator=self.generator)
            self.deltas[e] = self.std * eps.to(self.theta)
            if self.perturbation == "parameters":
                torch.nn.utils.vector_to_parameters(self.theta + self.deltas[e], self.copies[e].parameters())
            self.num_samples += 1
        self.steps_since[idx] = 0
        self.pending[idx] = False

    def act(self, obs: Tensor) -> Tensor:
        """Greedy actions [E] on each env's current sample θ̃_e for observations [E, D]."""
        if self.like is None:
            raise RuntimeError("PosteriorExplorer.act before set_posterior: no parameters yet")
        if self.resample == "steps":
            self.pending |= self.steps_since >= self.every
        if bool(self.pending.any()):
            self._draw(self.pending.clone())
        self.steps_since += 1
        if self.perturbation == "linearised":
            from algorithms.eve.losses import linearised_q_sample

            if self._delta_views is None or len(self._delta_views[0]) != len(self.like):
                self._delta_views = [unflatten_like(row, self.like) for row in self.deltas]
            q = torch.cat([linearised_q_sample(self.copies[0], obs[e : e + 1], self._delta_views[e])
                           for e in range(self.num_envs)])
            return greedy_actions(q)
        with torch.no_grad():
            if self.num_envs == 1:
                return greedy_actions(self.copies[0](obs))
            q = torch.cat([net(obs[e : e + 1]) for e, net in enumerate(self.copies)])
            return greedy_actions(q)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "deltas": None if self.deltas is None else self.deltas.clone(),
            "steps_since": self.steps_since.clone(),
            "pending": self.pending.clone(),
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.deltas = None if state["deltas"] is None else state["deltas"].clone()
        self._delta_views = None
        if self.deltas is not None and self.like is not None:
            self._write_copies()
        self.steps_since = state["steps_since"].clone()
        self.pending = state["pending"].clone()
        self.num_samples = int(state["num_samples"])
