"""Seed packing: aggregate env steps per second of 8 EVE seeds on bsuite deep_sea (size 10), as 8 trials
vs packs of K = 2, 4, 8 (``pack_seeds``; algorithms/offpolicy/packing.py).

Measured (each result one JSON line, printed and appended to benchmarks/results/packed_seeds.jsonl as soon
as it is measured; lines already there with the same key are skipped, so an interrupted run resumes;
--force measures again):

- ``tune``: the real launch. ``orchestration.run`` of a spec with seeds 0..7, ``pack_seeds: K``
  (K = 1: 8 trials), EVE's defaults, ``stop: {steps: S}``, MLflow tracking into a fresh SQLite store,
  Ray on this machine's CPUs, started once before the first launch; wall time of the whole ``run()``
  (trial start-up, training, tracking).
  ``env_steps_per_s`` = 8·S / wall: the aggregate rate of the study.
- ``core``: the same work without Ray or Tune, in this process: 8 seeds trained one after another as
  8 (env runner, learner) pairs in the core's loop (sample one chunk, insert, the updates due, weight copy),
  or as 8/K ``ReplicaPack``s; what packing saves inside one trial (the shared loop and stacked optimiser
  step), not the per-trial overhead.
Every line records the load average (1, 5, 15 min) and the CPU count: the machine this was written on had
2 cores shared with other work, so compare lines measured side by side (``--what`` runs them interleaved).

Usage: .venv/bin/python benchmarks/packed_seeds.py [--what core,tune] [--packs 1,2,4,8] [--steps 2000]
       [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_REPORT_URL", "http://127.0.0.1:9/")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "packed_seeds.jsonl"
ENV = "bsuite/deep_sea-0"
SEEDS = list(range(8))


def _done() -> set[str]:
    if not RESULTS.exists():
        return set()
    return {json.loads(line)["key"] for line in RESULTS.read_text().splitlines() if line.strip()}


def _emit(rec: dict[str, Any]) -> None:
    rec = {**rec, "load_avg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
           "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    line = json.dumps(rec)
    print(line, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(line + "\n")


# ---- in-process ---------------------------------------------------------------------------------------
def _config(seed: int) -> Any:
    from algorithms.eve.config import EVEConfig

    return EVEConfig().environment(ENV).debugging(seed=seed)


def _copy_weights(learner: Any, runner: Any, plan: dict) -> None:
    """Learner module -> runner module in place (what OffPolicyAlgorithm._sync_weights does locally)."""
    import torch

    from algorithms.offpolicy.algorithm import _tensor_pairs

    src = learner.module["default_policy"].unwrapped()
    pairs = plan.setdefault(id(learner), _tensor_pairs(src, runner.module))
    with torch.no_grad():
        for (d_owner, d_name), (s_owner, s_name) in pairs:
            getattr(d_owner, d_name).copy_(getattr(s_owner, s_name))
    runner.on_weights_set()


def _train_loop(sample, update, sync, cfg: Any, steps: int) -> None:
    """The core's training_step order until ``steps`` env steps per seed were inserted."""
    from algorithms.offpolicy.ratio import updates_due

    inserted = done = 0
    while inserted < steps:
        inserted += sample()
        due = updates_due(inserted, int(cfg.train_batch_size_per_learner), float(cfg.samples_per_insert), done,
                          int(cfg.learning_starts))
        while due > 0:
            k = min(due, int(cfg.max_updates_per_call))
            update(k, {"num_env_steps_sampled_lifetime": inserted})
            done += k
            due -= k
        sync()


def core(pack: int, steps: int) -> dict[str, Any]:
    import torch

    from algorithms.offpolicy.inprocess import build_runner_and_learner
    from algorithms.offpolicy.packing import Replica, ReplicaPack
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    cfg = _config(0)
    groups = [SEEDS[i : i + pack] for i in range(0, len(SEEDS), pack)]
    built = [[(s, *build_runner_and_learner(_config(s))) for s in g] for g in groups]
    plan: dict = {}
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for group in built:
        if pack == 1:
            _, runner, learner = group[0]

            def sample(runner=runner, learner=learner) -> int:
                data = runner.sample()
                learner.insert(data)
                return int(data["reward"].size)

            _train_loop(sample, learner.run_updates, lambda r=runner, lr=learner: _copy_weights(lr, r, plan), cfg,
                        steps)
        else:
            p = ReplicaPack([Replica(s, r, lr) for s, r, lr in group], cfg)
            _train_loop(p.sample, p.run_updates, p.sync_weights, cfg, steps)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "env_steps_per_s": round(len(SEEDS) * steps / wall, 1),
            "env_steps_per_cpu_s": round(len(SEEDS) * steps / cpu, 1)}


# ---- Tune ---------------------------------------------------------------------------------------------
def tune_run(pack: int, steps: int) -> dict[str, Any]:
    from orchestration.runner import run

    with tempfile.TemporaryDirectory(prefix="packed_seeds_") as d:
        t = {"uri": f"sqlite:///{d}/mlflow.db", "artifacts": f"{d}/artifacts", "storage": f"{d}/runs"}
        t0 = time.perf_counter()
        out = run({"name": f"packed_seeds_k{pack}", "algorithm": "EVE", "env": ENV, "seeds": SEEDS,
                   "pack_seeds": pack, "config": {"min_sample_timesteps_per_iteration": min(steps, 1000)},
                   "stop": {"steps": steps}, "checkpoint": {"at_end": False}, "tracking": t})
        wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "env_steps_per_s": round(len(SEEDS) * steps / wall, 1),
            "trials": len(out.trials), "errors": out.num_errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="core,tune")
    ap.add_argument("--packs", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=2000, help="env steps per seed")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    done = set() if args.force else _done()
    if "tune" in args.what:  # start Ray once, so the first measured launch does not pay for it
        from orchestration.runner import init_ray

        init_ray()
    for what in args.what.split(","):
        for pack in [int(k) for k in args.packs.split(",")]:
            key = f"{what}/pack{pack}/steps{args.steps}"
            if key in done:
                print(f"skip {key} (in {RESULTS.name})")
                continue
            measure = core if what == "core" else tune_run
            _emit({"key": key, "what": what, "pack_seeds": pack, "seeds": len(SEEDS), "steps_per_seed": args.steps,
                   "env": ENV, **measure(pack, args.steps)})


if __name__ == "__main__":
    main()
