"""Shared Tune-task logic for DataRater workloads (meta-training, metrics, evaluation, checkpoints).

A workload supplies a :class:`~algorithms.datarater.meta_training.RaterProblem` plus a fixed scoring
sample with known corruption labels (for AUROC and per-corruption scores) and a clean held-out set
(for the evaluation of fresh models trained on unfiltered vs filtered data).

Per iteration: ``meta_steps_per_iteration`` meta-steps of the population, then metrics

    meta/outer_loss, meta/meta_grad_norm, meta/step, meta/score/mean, meta/score/std,
    meta/auroc (clean vs corrupted, higher score = cleaner), meta/score/<corruption> (mean score),

and every ``eval_every`` iterations the evaluation (eval/...) and a score histogram per corruption
type (PNG in ``artifact_dir``).

Evaluation protocol (algorithms/datarater/evaluation.py has the formulas):
1. Fresh inner models (Adam, ``eval_lr``, batches of N = ``eval_batch_size``) are trained for
   S = ``eval_steps`` steps on unfiltered data and, for every ρ in ``eval_rhos``, on batch-top-K
   filtered data (N kept of ⌈N/(1−ρ)⌉ candidates scored by the current rater). Each condition is run
   with the same ``eval_seeds`` model initialisations (paired); the held-out loss curves (clean
   held-out set, every ``eval_interval`` steps) are averaged over these seeds.
2. Target: the unfiltered mean curve's final loss L_u(S). s*(ρ): the step where the filtered mean curve
   first reaches it (linear interpolation between evaluations).
3. Compute in FLOPs (torch's FLOP counter): a training step F_train (forward + backward on N), the
   rater's inference on all ⌈N/(1−ρ)⌉ candidates of a step, and meta-training C_meta = meta-steps x
   FLOPs of one population meta-step (counted with the reverse engine's products; the MixFlow engines
   recompute the inner step in their backward, so for them C_meta is a lower bound).
4. Reported per ρ: eval/steps_saved (1 − s*/S), eval/compute_saved (rater inference counted),
   eval/compute_saved_with_meta (C_meta counted for this one training) and
   eval/break_even_trainings (C_meta / FLOPs saved per training: how many trainings one meta-trained
   rater must filter to repay its meta-training). NaN where the target is never reached.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from algorithms.datarater.evaluation import (
    break_even_trainings,
    compute_saved,
    count_flops,
    steps_to_reach,
    train_fresh,
)
from algorithms.datarater.filtering import auroc, candidates_for
from algorithms.datarater.meta_training import MetaSettings, RaterPopulation
from algorithms.datarater.objective import Batch
from algorithms.meta import meta_gradient
from algorithms.tasks.base import Task, TaskConfig

EngineName = Literal["reverse", "reverse_remat", "mixflow", "mixflow_remat"]


class DataRaterTaskConfig(TaskConfig):
    engine: EngineName = "mixflow"
    """Meta-gradient engine (algorithms/meta/engines.py)."""
    T: int = Field(2, ge=1)
    """Inner steps unrolled per meta-gradient (the paper: T = 2)."""
    population: int = Field(8, ge=1)
    """Inner models in the population (the paper: 8)."""
    backend: Literal["local", "ray"] = "local"
    """local: members in the trial process; ray: one Ray actor per member."""
    actor_num_cpus: float = Field(1.0, gt=0)
    """CPUs per member actor (backend=ray)."""
    actor_num_gpus: float = Field(0.0, ge=0)
    """GPUs per member actor (backend=ray)."""
    inner_optimizer: Literal["adam", "sgd"] = "adam"
    inner_lr: float = Field(1e-2, gt=0)
    outer_lr: float = Field(1e-3, gt=0)
    """Outer Adam learning rate of each member on the rater."""
    batch_size: int = Field(64, ge=2)
    outer_batch_size: int = Field(64, ge=1)
    reinit_every: int = Field(50, ge=0)
    """Re-initialise each inner model after this many meta-steps (0: never); staggered."""
    microbatch: int | None = Field(None, ge=1)
    """Examples per chunk in the MixFlow JVP (None: whole batch)."""
    meta_steps_per_iteration: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)
    """Run the filtered-vs-unfiltered evaluation every this many iterations (0: never)."""
    eval_rhos: list[float] = [0.1, 0.25, 0.5]
    """Discard fractions ρ evaluated with batch top-K."""
    eval_steps: int = Field(300, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    eval_lr: float = Field(1e-2, gt=0)
    eval_interval: int = Field(25, ge=1)
    """Held-out loss is recorded every this many training steps."""
    eval_seeds: int = Field(1, ge=1)
    """Fresh models per condition (their held-out curves are averaged)."""

    @field_validator("eval_rhos")
    @classmethod
    def _rhos(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0 <= r < 1:
                raise ValueError(f"eval_rhos entry {r}: allowed values are 0 <= rho < 1")
        return v


class DataRaterTask(Task):
    """Base of the DataRater workloads; subclasses build ``self.problem`` and the fixed sets."""

    Config = DataRaterTaskConfig
    corruption_names: tuple[str, ...] = ("clean",)

    def __init__(self, config: DataRaterTaskConfig, seed: int, artifact_dir: Path | None = None):
        super().__init__(config, seed, artifact_dir)
        self.problem = self.build_problem()
        c = config
        self.settings = MetaSettings(
            engine=c.engine, T=c.T, inner_optimizer=c.inner_optimizer, inner_lr=c.inner_lr, outer_lr=c.outer_lr,
            batch_size=c.batch_size, outer_batch_size=c.outer_batch_size, reinit_every=c.reinit_every,
            microbatch=c.microbatch,
        )
        self.population = RaterPopulation(
            self.problem, self.settings, seed, c.population, c.backend,
            {"num_cpus": c.actor_num_cpus, "num_gpus": c.actor_num_gpus},
        )
        self.iteration = 0
        # Every evaluation key is reported from the first iteration on (NaN until the first evaluation),
        # so a spec may name one as its Tune metric (Tune rejects results that lack the metric).
        self.last_eval: dict[str, float] = dict.fromkeys(self.eval_metric_names(), float("nan"))

    # --- to implement ---
    def build_problem(self) -> Any:
        raise NotImplementedError

    def scoring_set(self) -> tuple[Batch, torch.Tensor]:
        """A fixed sample of training-pool examples and their corruption codes (0 = clean)."""
        raise NotImplementedError

    def heldout_set(self) -> Batch:
        raise NotImplementedError

    # --- iteration ---
    def train(self) -> dict[str, float]:
        c = self.config
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        for _ in range(c.meta_steps_per_iteration):
            s = self.population.meta_step()
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v / c.meta_steps_per_iteration
        self.steps += c.meta_steps_per_iteration * c.T * c.population
        self.iteration += 1
        metrics = {
            "meta/outer_loss": stats["outer_loss"],
            "meta/meta_grad_norm": stats["meta_grad_norm"],
            "meta/step": float(self.population.meta_steps),
            "meta/seconds_per_meta_step": (time.perf_counter() - t0) / c.meta_steps_per_iteration,
        }
        metrics.update(self.score_metrics())
        if c.eval_every and self.iteration % c.eval_every == 0:
            self.last_eval = self.evaluate()
        metrics.update(self.last_eval)
        print(f"[{type(self).__name__}] iter {self.iteration} meta-step {self.population.meta_steps} "
              f"outer_loss {metrics['meta/outer_loss']:.4f} auroc {metrics['meta/auroc']:.3f}", flush=True)
        return metrics

    def score_metrics(self) -> dict[str, float]:
        batch, codes = self.scoring_set()
        scores = self.population.scores(batch.r)
        out = {
            "meta/score/mean": float(scores.mean()), "meta/score/std": float(scores.std()),
            "meta/auroc": auroc(scores, codes > 0),
        }
        for code, name in enumerate(self.corruption_names):
            sel = codes == code
            if sel.any():
                out[f"meta/score/{name}"] = float(scores[sel].mean())
                if code > 0:
                    clean_or_this = (codes == 0) | sel
                    out[f"meta/auroc/{name}"] = auroc(scores[clean_or_this], sel[clean_or_this])
        return out

    # --- evaluation ---
    def flops(self) -> dict[str, float]:
        """FLOPs of one training step (batch N), one rater inference per example, one population meta-step."""
        c, p = self.config, self.problem
        gen = torch.Generator().manual_seed(0)
        model = p.make_inner_model()
        b = p.sample_train(gen, c.eval_batch_size)
        f_train = count_flops(lambda: p.per_example_loss(model(b.x), b.y).mean().backward())
        f_rate = count_flops(lambda: self.population.scores(b.r)) / c.eval_batch_size
        member = self.population.members[0] if c.backend == "local" else None
        if member is not None:
            mb = [p.sample_train(gen, c.batch_size) for _ in range(c.T)]
            ob = p.sample_outer(gen, c.outer_batch_size)
            # FLOPs are counted with the reverse engine (the same products; MixFlow's JVP is not
            # visible to the FLOP counter's dispatch mode under torch.func transforms).
            f_meta = count_flops(lambda: meta_gradient(
                member.inner_loss, member.outer_loss, member.opt, member.theta, member.opt_state,
                self.population.eta, mb, ob, "reverse")) * c.population
        else:
            f_meta = float("nan")
        return {"train_step": f_train, "rate_example": f_rate, "meta_step": f_meta}

    def eval_metric_names(self) -> list[str]:
        """The keys :meth:`evaluate` reports (empty when ``eval_every`` is 0)."""
        if not self.config.eval_every:
            return []
        names = ["eval/loss/unfiltered", "eval/flops/train_step", "eval/flops/rate_example",
                 "eval/flops/meta_training", "eval/flops/unfiltered_run"]
        for rho in self.config.eval_rhos:
            tag = f"rho_{rho:g}"
            names += [f"eval/{k}/{tag}" for k in ("loss", "steps_to_unfiltered_loss", "steps_saved", "flops/rate_step",
                                                  "compute_saved", "compute_saved_with_meta", "break_even_trainings")]
        return names

    def evaluate(self) -> dict[str, float]:
        c, p = self.config, self.problem
        heldout = self.heldout_set()
        scorer = self.population.scores

        def curve(rho: float | None):
            curves = [
                train_fresh(p.make_inner_model, p.per_example_loss, p.sample_train, heldout, c.eval_steps,
                            c.eval_batch_size, c.eval_lr, seed=10_000 + 97 * i + self.seed, eval_every=c.eval_interval,
                            scorer=None if rho is None else scorer, rho=rho or 0.0)
                for i in range(c.eval_seeds)
            ]
            losses = [sum(cv.losses[j] for cv in curves) / len(curves) for j in range(len(curves[0].losses))]
            return type(curves[0])(curves[0].steps, losses)

        base = curve(None)
        target = base.losses[-1]
        fl = self.flops()
        meta_total = fl["meta_step"] * self.population.meta_steps
        S = c.eval_steps
        out = {"eval/loss/unfiltered": target, "eval/flops/train_step": fl["train_step"],
               "eval/flops/rate_example": fl["rate_example"], "eval/flops/meta_training": meta_total,
               "eval/flops/unfiltered_run": S * fl["train_step"]}
        for rho in c.eval_rhos:
            cv = curve(rho)
            s_star = steps_to_reach(cv, target, interpolate=True)
            rate_per_step = candidates_for(c.eval_batch_size, rho) * fl["rate_example"]
            tag = f"rho_{rho:g}"
            out[f"eval/loss/{tag}"] = cv.losses[-1]
            out[f"eval/steps_to_unfiltered_loss/{tag}"] = float(s_star) if s_star is not None else float("nan")
            out[f"eval/steps_saved/{tag}"] = compute_saved(s_star, S, 1.0, 0.0)
            out[f"eval/flops/rate_step/{tag}"] = rate_per_step
            out[f"eval/compute_saved/{tag}"] = compute_saved(s_star, S, fl["train_step"], rate_per_step)
            out[f"eval/compute_saved_with_meta/{tag}"] = compute_saved(
                s_star, S, fl["train_step"], rate_per_step, meta_total)
            out[f"eval/break_even_trainings/{tag}"] = break_even_trainings(
                s_star, S, fl["train_step"], rate_per_step, meta_total)
        assert out.keys() == set(self.eval_metric_names()), "eval_metric_names() is out of date"
        self.write_histogram()
        return out

    def write_histogram(self) -> Path | None:
        if self.artifact_dir is None:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batch, codes = self.scoring_set()
        scores = self.population.scores(batch.r)
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = torch.linspace(float(scores.min()), float(scores.max()) + 1e-6, 40).numpy()
        for code, name in enumerate(self.corruption_names):
            sel = codes == code
            if sel.any():
                ax.hist(scores[sel].numpy(), bins=bins, alpha=0.5, label=f"{name} ({int(sel.sum())})")
        ax.set_xlabel("rater score")
        ax.set_ylabel("examples")
        ax.set_title(f"{type(self).__name__}: scores after {self.population.meta_steps} meta-steps")
        ax.legend()
        path = Path(self.artifact_dir) / f"score_histogram_meta_step_{self.population.meta_steps:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    # --- checkpoint ---
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "iteration": self.iteration, "population": self.population.state_dict(),
                "last_eval": dict(self.last_eval)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.iteration = state["steps"], state["iteration"]
        self.population.load_state_dict(state["population"])
        self.last_eval = dict(state["last_eval"])

    def modules(self) -> dict[str, Any]:
        return {"rater": self.population.rater}

    def __del__(self) -> None:
        pop = getattr(self, "population", None)
        if pop is not None and pop.backend == "ray":
            try:
                pop.shutdown()
            except Exception:  # noqa: BLE001 - Ray may already be shut down at interpreter exit
                pass
