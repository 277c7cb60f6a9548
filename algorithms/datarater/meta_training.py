"""DataRater meta-training with a population of inner models (Calian et al. 2025, §2, Alg. 1).

One meta-step, for every member k of the population (in-process, or one Ray actor per member):

    θ_k ← T inner steps of Adam on  L_in(θ, η; b) = Σ_i σ_b(φ_η(x))_i ℓ(θ; x_i)      (engine of choice)
    g_k = dL_out(θ_k; b_out)/dη                                                      (meta-gradient)
    η_k = OuterAdam_k(η, g_k)                              (each member has its own outer Adam state)

then the rater parameters are the mean  η ← 1/K Σ_k η_k.  Member k re-initialises its inner model
every ``reinit_every`` meta-steps (staggered across members so the population mixes model ages).

The member is plain torch; the Ray path only wraps the same class as an actor, so the in-process
and actor results are the same for the same seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from algorithms.datarater.objective import Batch, make_inner_loss, make_outer_loss
from algorithms.meta import load_params_, make_inner_optimizer, meta_gradient, param_tuple
from algorithms.meta.engines import check_engine
from algorithms.meta.functional import functional


class RaterProblem(Protocol):
    """What a workload provides to meta-training (picklable: it is sent to Ray actors)."""

    def make_inner_model(self) -> nn.Module: ...

    def make_rater(self) -> nn.Module: ...

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor: ...

    def sample_train(self, gen: torch.Generator, n: int) -> Batch: ...

    def sample_outer(self, gen: torch.Generator, n: int) -> Batch: ...


def rater_scores(rater: nn.Module, params: tuple[Tensor, ...], r: Tensor) -> Tensor:
    """φ_η(r) -> [B] (a trailing singleton output dimension is dropped)."""
    s = functional(rater)(params, r)
    return s.squeeze(-1) if s.dim() > 1 else s


@dataclass(frozen=True)
class MetaSettings:
    """Hyperparameters of DataRater meta-training (defaults: the paper's choices where it has them)."""

    engine: str = "mixflow"
    T: int = 2
    inner_optimizer: str = "adam"
    inner_lr: float = 1e-3
    outer_lr: float = 1e-3
    batch_size: int = 64
    outer_batch_size: int = 64
    reinit_every: int = 50
    microbatch: int | None = None
    threads: int | None = None


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class InnerMember:
    """One inner model of the population with its inner optimiser state and its own outer Adam."""

    def __init__(self, problem: RaterProblem, settings: MetaSettings, seed: int, index: int, population: int = 1):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        check_engine(settings.engine)
        self.problem, self.s, self.index = problem, settings, index
        self.gen = _seeded(seed * 1_000_003 + index)
        self.model = self._fresh_model()
        self.rater = problem.make_rater()
        model_fn = functional(self.model)
        self.inner_loss = make_inner_loss(
            model_fn, lambda m, r: rater_scores(self.rater, m, r), problem.per_example_loss, settings.microbatch
        )
        self.outer_loss = make_outer_loss(model_fn, problem.per_example_loss, settings.microbatch)
        self.opt = make_inner_optimizer(settings.inner_optimizer, settings.inner_lr)
        self.theta = param_tuple(self.model)
        self.opt_state = self.opt.init(self.theta)
        self.outer_params = [nn.Parameter(p.detach().clone()) for p in self.rater.parameters()]
        self.outer_opt = torch.optim.Adam(self.outer_params, lr=settings.outer_lr)
        self.meta_steps = 0
        # Stagger re-initialisation across the population.
        self.age = (index * settings.reinit_every) // population if settings.reinit_every else 0

    def _fresh_model(self) -> nn.Module:
        init_seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return self.problem.make_inner_model()

    def _reinit(self) -> None:
        load_params_(self.model, param_tuple(self._fresh_model()))
        self.theta = param_tuple(self.model)
        self.opt_state = self.opt.init(self.theta)
        self.age = 0

    def step(self, rater_params: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], dict[str, float]]:
        """One meta-step of this member from the shared η; returns η_k after its own outer Adam step."""
        s = self.s
        if s.reinit_every and self.age >= s.reinit_every:
            self._reinit()
        batches = [self.problem.sample_train(self.gen, s.batch_size) for _ in range(s.T)]
        outer_batch = self.problem.sample_outer(self.gen, s.outer_batch_size)
        res = meta_gradient(self.inner_loss, self.outer_loss, self.opt, self.theta, self.opt_state,
                            tuple(rater_params), batches, outer_batch, s.engine)
        self.theta, self.opt_state = res.params, res.opt_state
        with torch.no_grad():
            for p, v, g in zip(self.outer_params, rater_params, res.grads, strict=True):
                p.copy_(v)
                p.grad = g.clone()
        self.outer_opt.step()
        self.age += 1
        self.meta_steps += 1
        grad_norm = torch.sqrt(sum(g.pow(2).sum() for g in res.grads))
        return tuple(p.detach().clone() for p in self.outer_params), {
            "outer_loss": float(res.outer_loss), "meta_grad_norm": float(grad_norm), "age": float(self.age),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "gen": self.gen.get_state(), "theta": self.theta, "opt_state": self.opt_state,
            "outer_params": [p.detach().clone() for p in self.outer_params],
            "outer_opt": self.outer_opt.state_dict(), "meta_steps": self.meta_steps, "age": self.age,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.theta, self.opt_state = tuple(state["theta"]), tuple(state["opt_state"])
        load_params_(self.model, self.theta)
        with torch.no_grad():
            for p, v in zip(self.outer_params, state["outer_params"], strict=True):
                p.copy_(v)
        self.outer_opt.load_state_dict(state["outer_opt"])
        self.meta_steps, self.age = state["meta_steps"], state["age"]


class RaterPopulation:
    """The rater η and K inner members; ``meta_step`` averages the members' outer Adam updates.

    backend="local": members are plain objects in this process. backend="ray": one Ray actor per
    member with ``actor_options`` (e.g. ``{"num_cpus": 1, "num_gpus": 0}``), so the population can
    span a trial's extra resource bundles (Tune captures child actors into the trial's placement group).
    """

    def __init__(
        self, problem: RaterProblem, settings: MetaSettings, seed: int, population: int = 8,
        backend: str = "local", actor_options: dict[str, Any] | None = None,
    ):
        if population < 1:
            raise ValueError(f"population={population}: allowed values are integers >= 1")
        if backend not in ("local", "ray"):
            raise ValueError(f"backend={backend!r}: allowed values are 'local', 'ray'")
        self.settings, self.backend = settings, backend
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rater = problem.make_rater()
        self.eta = param_tuple(self.rater)
        self.meta_steps = 0
        if backend == "local":
            self.members: list[Any] = [InnerMember(problem, settings, seed, k, population) for k in range(population)]
        else:
            import ray

            opts = {"num_cpus": 1, **(actor_options or {})}
            s = settings if settings.threads else MetaSettings(**{**asdict(settings),
                                                                   "threads": max(1, int(opts["num_cpus"]))})
            cls = ray.remote(InnerMember).options(**opts)
            self.members = [cls.remote(problem, s, seed, k, population) for k in range(population)]

    def _call(self, method: str, *args: Any) -> list[Any]:
        if self.backend == "local":
            return [getattr(m, method)(*args) for m in self.members]
        import ray

        return ray.get([getattr(m, method).remote(*args) for m in self.members])

    def meta_step(self) -> dict[str, float]:
        """η ← mean_k OuterAdam_k(η, ∇_η L_out^k); returns population-mean statistics."""
        results = self._call("step", self.eta)
        etas = [r[0] for r in results]
        self.eta = tuple(torch.stack(ps).mean(0) for ps in zip(*etas, strict=True))
        load_params_(self.rater, self.eta)
        self.meta_steps += 1
        stats = [r[1] for r in results]
        return {k: sum(st[k] for st in stats) / len(stats) for k in stats[0]}

    def scores(self, r: Tensor, chunk: int = 1024) -> Tensor:
        """φ_η(r) for many examples, in chunks, without gradients."""
        with torch.no_grad():
            return torch.cat([rater_scores(self.rater, self.eta, r[i : i + chunk]) for i in range(0, len(r), chunk)])

    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "meta_steps": self.meta_steps, "members": self._call("state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eta, self.meta_steps = tuple(state["eta"]), state["meta_steps"]
        load_params_(self.rater, self.eta)
        if self.backend == "local":
            for m, st in zip(self.members, state["members"], strict=True):
                m.load_state_dict(st)
        else:
            import ray

            ray.get([m.load_state_dict.remote(st) for m, st in zip(self.members, state["members"], strict=True)])

    def shutdown(self) -> None:
        if self.backend == "ray":
            import ray

            for m in self.members:
                ray.kill(m)
            self.members = []
