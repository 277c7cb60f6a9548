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
  or as 8/K ``ReplicaPack``s; what packing saves inside one trial (the shared loop, stacked optimiser
  step and, where the learner supports it, all replicas' losses in one vmapped call), not the per-trial
  overhead. ``--learner qlearner``: the core's Q-learner (exploration="epsilon_greedy", whose packs vmap
  the losses) instead of EVE (posterior Fisher: losses replica by replica); ``--loop``: packs run the
  losses replica by replica anyway (the path before vectorisation). Keys get ``/qlearner`` and ``/loop``.
- ``single`` (``--what single``): single-seed speed, one seed (0), in this process, four arms run
  interleaved (each arm's ``--steps`` timed env steps per round, ``--repeats`` rounds, the order reversed
  every other round): ``qlearner`` (the core's epsilon-greedy Q-learner: EVEConfig with
  exploration="epsilon_greedy", the core's loop as in ``core``), ``eve`` (exploration="posterior", same
  loop), ``bare`` (a plain PyTorch DQN loop written below: epsilon-greedy, numpy ring replay, Adam,
  target net) and ``sb3`` (Stable-Baselines3's DQN, ``learn``). Matched settings (SINGLE): one update of
  batch 32 per env step, one hidden layer of 64 ReLU units, one shared MLP with A outputs, no norm, Adam
  lr 1e-3, no gradient clipping, γ 0.99, hard target copy every 50 updates, replay 100,000,
  learning_starts 100 (not timed: each arm first runs 100 + WARMUP env steps), ε 1 -> 0.05 linearly over
  1,000 env steps, plain (not double) Q-learning targets; the env is ``gym.make(ENV)``, what the
  core's runner makes. Differences left: SB3's loss is Huber (smooth L1), the others' the squared TD
  error over 2σ² (EVE's return-density NLL); EVE also tracks its Fisher and acts on posterior samples.
  ``env_steps_per_s`` (wall) and ``env_steps_per_cpu_s`` (time.process_time) per arm, the ratios
  core/bare and core/sb3 on both.
Every line records the load average (1, 5, 15 min) and the CPU count: the machine this was written on had
2 cores shared with other work, so compare lines measured side by side (``--what`` runs them interleaved).

Usage: .venv/bin/python benchmarks/packed_seeds.py [--what core,tune] [--packs 1,2,4,8] [--steps 2000]
       [--learner eve|qlearner] [--loop] [--tag TAG] [--force]
       .venv/bin/python benchmarks/packed_seeds.py --what single [--steps 3000] [--repeats 2] [--force]
       .venv/bin/python benchmarks/packed_seeds.py --what profile [--steps 3000]   (cProfile of ``qlearner``)
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
LEARNERS = {"eve": "posterior", "qlearner": "epsilon_greedy"}
"""``--learner``: EVE's defaults, or the core's Q-learner (the same config with exploration="epsilon_greedy")."""


def _config(seed: int, learner: str = "eve") -> Any:
    from algorithms.eve.config import EVEConfig

    return EVEConfig().environment(ENV).debugging(seed=seed).training(exploration=LEARNERS[learner])


def _copy_weights(learner: Any, runner: Any, plan: dict) -> None:
    """Learner module -> runner module in place (what OffPolicyAlgorithm._sync_weights does locally)."""
    import torch

    from algorithms.offpolicy.algorithm import _tensor_pairs

    src = learner.module["default_policy"].unwrapped()
    if id(learner) not in plan:  # built once (setdefault would build the pairs on every call)
        plan[id(learner)] = _tensor_pairs(src, runner.module)
    pairs = plan[id(learner)]
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


def core(pack: int, steps: int, kind: str = "eve", loop: bool = False) -> dict[str, Any]:
    import torch

    from algorithms.offpolicy.inprocess import build_runner_and_learner
    from algorithms.offpolicy.packing import Replica, ReplicaPack
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    cfg = _config(0, kind)
    groups = [SEEDS[i : i + pack] for i in range(0, len(SEEDS), pack)]
    built = [[(s, *build_runner_and_learner(_config(s, kind))) for s in g] for g in groups]
    vectorised = None
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
            p = ReplicaPack([Replica(s, r, lr) for s, r, lr in group], cfg, vectorise=not loop)
            vectorised = p.vectorised
            _train_loop(p.sample, p.run_updates, p.sync_weights, cfg, steps)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "env_steps_per_s": round(len(SEEDS) * steps / wall, 1),
            "env_steps_per_cpu_s": round(len(SEEDS) * steps / cpu, 1), "learner": kind, "vectorised": vectorised}


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


# ---- single seed: the core vs a bare PyTorch loop vs Stable-Baselines3 --------------------------------
SINGLE = {"batch": 32, "updates_per_env_step": 1, "hidden": [64], "activation": "relu", "lr": 1e-3, "gamma": 0.99,
          "target_update_period": 50, "replay_capacity": 100_000, "learning_starts": 100, "epsilon_initial": 1.0,
          "epsilon_final": 0.05, "epsilon_timesteps": 1000, "noise_var": 0.001, "double_q": False, "seed": 0}
WARMUP = 200
"""Env steps after learning_starts run before timing (first updates, lazy imports)."""


def _single_config(exploration: str) -> Any:
    from algorithms.eve.config import EVEConfig

    s = SINGLE
    return (EVEConfig().environment(ENV).debugging(seed=s["seed"])
            .training(exploration=exploration, train_batch_size_per_learner=s["batch"],
                      samples_per_insert=float(s["batch"] * s["updates_per_env_step"]), hidden=s["hidden"],
                      activation=s["activation"], norm="none", q_heads="shared", lr=s["lr"], gamma=s["gamma"],
                      grad_clip=None, target_update_period=s["target_update_period"],
                      replay_capacity=s["replay_capacity"], learning_starts=s["learning_starts"],
                      epsilon_initial=s["epsilon_initial"], epsilon_final=s["epsilon_final"],
                      epsilon_timesteps=s["epsilon_timesteps"], noise_var=s["noise_var"], double_q=s["double_q"],
                      rollout_fragment_length=1))


def core_single(exploration: str):
    """A function ``run(n)`` that trains one seed n more env steps in the core's loop (as ``core``, pack 1)."""
    from algorithms.offpolicy.inprocess import build_runner_and_learner
    from algorithms.offpolicy.ratio import updates_due

    cfg = _single_config(exploration)
    runner, learner = build_runner_and_learner(cfg)
    plan: dict = {}
    count = {"inserted": 0, "done": 0}
    batch, spi, starts = int(cfg.train_batch_size_per_learner), float(cfg.samples_per_insert), int(cfg.learning_starts)

    def run(n: int) -> None:
        end = count["inserted"] + n
        while count["inserted"] < end:
            data = runner.sample()
            learner.insert(data)
            count["inserted"] += int(data["reward"].size)
            due = updates_due(count["inserted"], batch, spi, count["done"], starts)
            while due > 0:
                k = min(due, int(cfg.max_updates_per_call))
                learner.run_updates(k, {"num_env_steps_sampled_lifetime": count["inserted"]})
                count["done"] += k
                due -= k
            _copy_weights(learner, runner, plan)

    return run


def bare_single():
    """``run(n)``: a plain PyTorch DQN loop (epsilon-greedy, numpy ring replay, one update per env step)."""
    import copy

    import gymnasium as gym
    import numpy as np
    import torch

    import algorithms.envs  # noqa: F401  (registers bsuite/...)

    s = SINGLE
    env = gym.make(ENV)
    obs_dim, num_actions = int(np.prod(env.observation_space.shape)), int(env.action_space.n)
    torch.manual_seed(s["seed"])
    rng = np.random.default_rng(s["seed"])
    q = torch.nn.Sequential(torch.nn.Linear(obs_dim, s["hidden"][0]), torch.nn.ReLU(),
                            torch.nn.Linear(s["hidden"][0], num_actions))
    q_target = copy.deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=s["lr"])
    cap = s["replay_capacity"]
    buf_obs = np.zeros((cap, obs_dim), np.float32)
    buf_next = np.zeros((cap, obs_dim), np.float32)
    buf_act = np.zeros(cap, np.int64)
    buf_rew = np.zeros(cap, np.float32)
    buf_term = np.zeros(cap, np.float32)
    state = {"t": 0, "size": 0, "updates": 0, "obs": env.reset(seed=s["seed"])[0].reshape(-1)}

    def run(n: int) -> None:
        for _ in range(n):
            t, o = state["t"], state["obs"]
            frac = min(1.0, t / s["epsilon_timesteps"])
            eps = s["epsilon_initial"] + frac * (s["epsilon_final"] - s["epsilon_initial"])
            if t < s["learning_starts"] or rng.random() < eps:
                a = int(rng.integers(num_actions))
            else:
                with torch.no_grad():
                    a = int(q(torch.from_numpy(o)).argmax())
            o2, r, term, trunc, _ = env.step(a)
            i = t % cap
            buf_obs[i], buf_act[i], buf_rew[i], buf_next[i], buf_term[i] = o, a, r, np.reshape(o2, -1), float(term)
            state["size"] = min(cap, state["size"] + 1)
            state["t"] = t + 1
            state["obs"] = env.reset()[0].reshape(-1) if term or trunc else np.reshape(o2, -1)
            if state["t"] <= s["learning_starts"]:
                continue
            for _ in range(s["updates_per_env_step"]):
                j = rng.integers(state["size"], size=s["batch"])
                ob, ac, re, nx, te = (torch.from_numpy(x[j]) for x in (buf_obs, buf_act, buf_rew, buf_next, buf_term))
                with torch.no_grad():
                    target = re + s["gamma"] * (1.0 - te) * q_target(nx).max(dim=1).values
                q_taken = q(ob).gather(1, ac[:, None]).squeeze(1)
                loss = (target - q_taken).square().mean() / (2.0 * s["noise_var"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                state["updates"] += 1
                if state["updates"] % s["target_update_period"] == 0:
                    q_target.load_state_dict(q.state_dict())

    return run


def sb3_single():
    """``run(n)``: Stable-Baselines3's DQN ``learn`` for n more env steps (train_freq 1, gradient_steps 1)."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import DQN

    import algorithms.envs  # noqa: F401

    s = SINGLE
    total = s["learning_starts"] + WARMUP + 10 * 3000
    model = DQN("MlpPolicy", gym.make(ENV), learning_rate=s["lr"], buffer_size=s["replay_capacity"],
                learning_starts=s["learning_starts"], batch_size=s["batch"], gamma=s["gamma"], train_freq=1,
                gradient_steps=s["updates_per_env_step"], target_update_interval=s["target_update_period"],
                exploration_initial_eps=s["epsilon_initial"], exploration_final_eps=s["epsilon_final"],
                exploration_fraction=s["epsilon_timesteps"] / total, max_grad_norm=1e10,
                policy_kwargs={"net_arch": s["hidden"], "activation_fn": torch.nn.ReLU}, seed=s["seed"], device="cpu")
    first = {"done": False}

    def run(n: int) -> None:
        model.learn(n, reset_num_timesteps=not first["done"])
        first["done"] = True

    return run


def single(steps: int, repeats: int) -> list[dict[str, Any]]:
    """Timed env steps per second of the four arms (see the module docstring), interleaved."""
    import torch

    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    arms = {"qlearner": lambda: core_single("epsilon_greedy"), "eve": lambda: core_single("posterior"),
            "bare": bare_single, "sb3": sb3_single}
    runs = {name: make() for name, make in arms.items()}
    for run in runs.values():
        run(SINGLE["learning_starts"] + WARMUP)
    wall = dict.fromkeys(runs, 0.0)
    cpu = dict.fromkeys(runs, 0.0)
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            runs[name](steps)
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    rate = {k: steps * repeats / wall[k] for k in runs}
    cpu_rate = {k: steps * repeats / cpu[k] for k in runs}
    return [{"arm": k, "wall_s": round(wall[k], 2), "cpu_s": round(cpu[k], 2), "env_steps_per_s": round(rate[k], 1),
             "env_steps_per_cpu_s": round(cpu_rate[k], 1),
             **({"over_bare": round(rate[k] / rate["bare"], 3), "over_bare_cpu": round(cpu_rate[k] / cpu_rate["bare"], 3),
                 "over_sb3": round(rate[k] / rate["sb3"], 3), "over_sb3_cpu": round(cpu_rate[k] / cpu_rate["sb3"], 3)}
                if k in ("qlearner", "eve") else {})} for k in runs]


def profile_qlearner(steps: int, top: int = 25) -> None:
    """cProfile of the core's Q-learner arm for ``steps`` env steps after warm-up; top entries by cumulative time."""
    import cProfile
    import pstats

    import torch

    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    run = core_single("epsilon_greedy")
    run(SINGLE["learning_starts"] + WARMUP)
    prof = cProfile.Profile()
    prof.runcall(run, steps)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="core,tune")
    ap.add_argument("--packs", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=2000, help="env steps per seed")
    ap.add_argument("--repeats", type=int, default=2, help="--what single: interleaved rounds")
    ap.add_argument("--learner", choices=sorted(LEARNERS), default="eve", help="--what core: EVE or the Q-learner")
    ap.add_argument("--loop", action="store_true", help="--what core: packs run the losses replica by replica")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--tag", default="", help="appended to the keys (/<tag>): label lines of one code version")
    args = ap.parse_args()
    done = set() if args.force else _done()
    if args.what == "profile":
        profile_qlearner(args.steps)
        return
    if args.what == "single":
        key = f"single/steps{args.steps}/repeats{args.repeats}"
        if f"{key}/qlearner" in done:
            print(f"skip {key} (in {RESULTS.name})")
            return
        for rec in single(args.steps, args.repeats):
            _emit({"key": f"{key}/{rec['arm']}", "what": "single", "env": ENV, "steps_timed": args.steps * args.repeats,
                   "warmup_env_steps": SINGLE["learning_starts"] + WARMUP, "settings": SINGLE, **rec})
        return
    if "tune" in args.what:  # start Ray once, so the first measured launch does not pay for it
        from orchestration.runner import init_ray

        init_ray()
    for what in args.what.split(","):
        for pack in [int(k) for k in args.packs.split(",")]:
            key = f"{what}/pack{pack}/steps{args.steps}"
            if what == "core" and args.learner != "eve":
                key += f"/{args.learner}"
            if what == "core" and args.loop:
                key += "/loop"
            if args.tag:
                key += f"/{args.tag}"
            if key in done:
                print(f"skip {key} (in {RESULTS.name})")
                continue
            rec = core(pack, args.steps, args.learner, args.loop) if what == "core" else tune_run(pack, args.steps)
            _emit({"key": key, "what": what, "pack_seeds": pack, "seeds": len(SEEDS), "steps_per_seed": args.steps,
                   "env": ENV, **rec})


if __name__ == "__main__":
    main()
