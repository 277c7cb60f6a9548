"""EVE on bsuite deep_sea, side by side with its epsilon-greedy baseline and RLlib's DQN.

Measured (each result one JSON line, printed and appended to benchmarks/results/eve_deep_sea.jsonl as
soon as it is measured; lines already there with the same key are skipped, so an interrupted run
resumes; --force measures again):

- ``throughput``: env steps per second of training at one update per env step (batch 32,
  samples_per_insert = 32 for EVE and the baseline, ``training_intensity`` = 32 for RLlib's DQN) on
  bsuite/deep_sea-0 (size 10), for EVE (exploration=posterior), the baseline
  (exploration=epsilon_greedy) and RLlib's DQN (new API stack, one local env runner), after a warm-up
  iteration; ``s_per_step`` and the ratios EVE/baseline time per step and EVE/DQN throughput.
  The three run interleaved, one iteration each per round, so they see the same machine load.
- ``deep_sea`` (EVE's default settings): for sizes N = 10, 12, ... (bsuite ids deep_sea/0, 1, ...), whether the agent solves
  deep_sea by bsuite's rule (running fraction of bad episodes < 0.9 before episode 2^N + 100; the run
  stops when solved or after min(2^N + 100, 10,000) episodes), for EVE and the baseline, one seed.
  The baseline runs first. Sizes go up until an agent fails a size (or --max-size, or --deadline-min); the summary line
  ``largest_solved`` gives the largest size solved with every smaller size solved too (also written
  when the deadline stops the climb; ``complete`` is false then: a larger size may still be solved).
Every line records the load average (1, 5, 15 min); throughput lines also give CPU-time rates
(``env_steps_per_cpu_s``, driver process) and the ratios on CPU time, which depend less on the load.

Goals: EVE solves N >= 30 with one network; EVE's time per step <= 1.5x the baseline's;
EVE's throughput >= 5x RLlib DQN's (47 env steps/s measured earlier on this machine).

Usage: .venv/bin/python benchmarks/eve_deep_sea.py [--what throughput,deep_sea] [--iters 5]
       [--max-size 30] [--deadline-min 60] [--seed 0]
       .venv/bin/python benchmarks/eve_deep_sea.py --what core --sizes 20,30 [--q-heads shared]
       [--set prior_precision=1 ...] [--network '{hidden: [64], activation: elu, norm: layer}'] [--minutes 40]
       (in-process runs; the settings that differ from the earlier defaults, CORE_KEY_BASELINE, and
       --network are part of the result key)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_REPORT_URL", "http://127.0.0.1:9/")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "eve_deep_sea.jsonl"
BATCH = 32
DEFAULTS_TAG = "/defaults2"
"""Suffix of the throughput and Ray deep_sea keys measured with EVEConfig's defaults of 2026-11-26 (per-action
heads, LayerNorm, λ = 0.1, target_noise_clip 1); keys without it were measured with the earlier defaults."""
GROUPED_TAG = "/grouped"
"""Suffix of throughput keys measured with the per-action towers run as one grouped network (GroupedMLP, from
2026-11-26); ``/defaults2`` keys without it ran the towers one by one."""
CORE_KEY_BASELINE = {"q_heads": "shared", "norm": "none", "prior_precision": 1.0, "target_noise_clip": None}
"""The earlier defaults: a core key names each of these settings whose effective value differs from them
(besides every other ``--set``), so a key means the same setting whatever EVEConfig's defaults are."""


def _done_keys(force: bool) -> set[str]:
    if force or not RESULTS.exists():
        return set()
    return {json.loads(line)["key"] for line in RESULTS.read_text().splitlines() if line.strip()}


def _write(line: dict[str, Any]) -> None:
    line = {**line, "host": platform.node(), "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)


def eve_config(exploration: str, env: str, seed: int, one_update_per_step: bool = False) -> Any:
    """EVE's defaults (the deep_sea setting); ``one_update_per_step`` sets samples_per_insert = batch."""
    from algorithms.diagnostics.rllib_bsuite import BsuiteSettings, make_bsuite_callback
    from algorithms.eve.config import EVEConfig

    cfg = (EVEConfig().environment(env).env_runners(num_env_runners=0).debugging(seed=seed)
           .training(exploration=exploration, train_batch_size_per_learner=BATCH)
           .callbacks(make_bsuite_callback(BsuiteSettings())))
    if one_update_per_step:
        cfg.training(samples_per_insert=float(BATCH))
    return cfg


def dqn_config(env: str, seed: int) -> Any:
    from ray.rllib.algorithms.dqn import DQNConfig

    return (DQNConfig().environment(env).env_runners(num_env_runners=0, rollout_fragment_length=1)
            .debugging(seed=seed)
            .training(train_batch_size_per_learner=BATCH, training_intensity=float(BATCH),
                      num_steps_sampled_before_learning_starts=100, lr=1e-3)
            .rl_module(model_config={"fcnet_hiddens": [64]})
            .reporting(min_sample_timesteps_per_iteration=1000))


def measure_throughput(iters: int, seed: int, force: bool, fragment: int = 1) -> None:
    """``fragment``: rollout_fragment_length of EVE and the baseline (env steps sampled per learner call;
    the updates per env step stay 1). RLlib's DQN keeps 1 (its training_intensity fixes the ratio)."""
    done = _done_keys(force)
    env = "bsuite/deep_sea-0"
    tag = "" if fragment == 1 else f"/fragment{fragment}"
    ours = f"{DEFAULTS_TAG}{GROUPED_TAG}"  # EVE and the baseline: the defaults' towers run as one grouped network
    keys = {name: f"throughput/{name}/{env}/batch{BATCH}/iters{iters}{tag}{ours if name != 'DQN' else ''}"
            for name in ("EVE", "baseline", "DQN")}
    if all(k in done for k in keys.values()):
        return
    cfgs = {"EVE": eve_config("posterior", env, seed, one_update_per_step=True),
            "baseline": eve_config("epsilon_greedy", env, seed, one_update_per_step=True)}
    for cfg in cfgs.values():
        cfg.rollout_fragment_length = fragment
    algos = {**{k: c.build_algo() for k, c in cfgs.items()}, "DQN": dqn_config(env, seed).build_algo()}
    q_networks = {k: type(a.learner_group._learner.module["default_policy"].unwrapped().q).__name__
                  for k, a in algos.items() if k != "DQN"} | {"DQN": "RLlib default"}
    steps = {k: 0 for k in algos}
    secs = {k: 0.0 for k in algos}
    cpu = {k: 0.0 for k in algos}  # driver-process CPU time: all three run in this process (no remote runners)
    for algo in algos.values():  # warm-up (burn-in, first updates, lazy imports)
        algo.train()
    for _ in range(iters):
        for name, algo in algos.items():
            t0, c0 = time.perf_counter(), time.process_time()
            r = algo.train()
            secs[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            steps[name] += int((r.get("env_runners") or {}).get("num_env_steps_sampled", 0))
    rate = {k: steps[k] / secs[k] for k in algos}
    cpu_rate = {k: steps[k] / cpu[k] for k in algos}
    for name in algos:
        _write({"key": keys[name], "bench": "throughput", "algo": name, "env": env, "batch": BATCH,
                "updates_per_env_step": 1, "iters": iters, "rollout_fragment_length": fragment if name != "DQN" else 1,
                "q_network": q_networks[name], "env_steps": steps[name], "seconds": secs[name],
                "cpu_seconds": cpu[name], "env_steps_per_s": rate[name], "s_per_step": 1.0 / rate[name],
                "env_steps_per_cpu_s": cpu_rate[name],
                "eve_time_per_step_over_baseline": rate["baseline"] / rate["EVE"],
                "eve_throughput_over_dqn": rate["EVE"] / rate["DQN"],
                "eve_cpu_per_step_over_baseline": cpu_rate["baseline"] / cpu_rate["EVE"],
                "eve_cpu_throughput_over_dqn": cpu_rate["EVE"] / cpu_rate["DQN"]})
    for algo in algos.values():
        algo.stop()


def solve_deep_sea(exploration: str, index: int, seed: int, deadline: float) -> dict[str, Any]:
    from algorithms.diagnostics.bsuite_scoring import deep_sea_episode_budget
    from algorithms.envs.bsuite import bsuite_experiment

    exp = bsuite_experiment(f"deep_sea/{index}")
    algo = eve_config(exploration, exp.env_id, seed).build_algo()
    t0 = time.perf_counter()
    r: dict[str, Any] = {}
    while time.time() < deadline:
        r = algo.train()
        if r.get("done"):
            break
    algo.stop()
    size = exp.kwargs["size"]
    ex = r.get("exploration") or {}
    return {"size": size, "bsuite_id": exp.bsuite_id, "finished": bool(r.get("done")),
            "solved": bool(ex.get(f"deep_sea/solved/size_{size}", 0.0)),
            "solved_episode": ex.get(f"deep_sea/solved_episode/size_{size}"),
            "episodes": ex.get(f"deep_sea/episodes/size_{size}"), "budget_episodes": deep_sea_episode_budget(size),
            "env_steps": r.get("num_env_steps_sampled_lifetime"), "seconds": time.perf_counter() - t0}


def measure_deep_sea(max_size: int, seed: int, deadline: float, force: bool) -> None:
    done = _done_keys(force)
    lines = [json.loads(x) for x in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    # The baseline first: it stops at its first failed size (its budget at size 10 is 1,124 episodes),
    # so under a deadline both arms get measured; EVE then climbs until it fails a size.
    for name, exploration in (("baseline", "epsilon_greedy"), ("EVE", "posterior")):
        for index in range(0, (max_size - 10) // 2 + 1):
            key = f"deep_sea/{name}/deep_sea-{index}/seed{seed}{DEFAULTS_TAG}"
            if key in done:
                prev = next(x for x in lines if x.get("key") == key)
                if not prev["solved"]:
                    break
                continue
            if time.time() > deadline:
                print(f"deadline reached before {key}", flush=True)
                break
            out = solve_deep_sea(exploration, index, seed, deadline)
            if not out["finished"]:  # not a result: the size was neither solved nor out of budget
                print(f"deadline reached during {key}: {out}", flush=True)
                break
            _write({"key": key, "bench": "deep_sea", "algo": name, "exploration": exploration, "seed": seed, **out})
            lines.append({"key": key, **out})
            if not out["solved"]:
                break
    for name in ("EVE", "baseline"):
        solved = {x["size"]: x["solved"] for x in lines if x.get("bench", "deep_sea") == "deep_sea"
                  and x.get("key", "").startswith(f"deep_sea/{name}/")
                  and x.get("key", "").endswith(f"seed{seed}{DEFAULTS_TAG}")}
        largest, n = None, 10
        while solved.get(n):
            largest, n = n, n + 2
        tried = sorted(solved)
        first_failed = next((s for s in tried if not solved[s]), None)
        key = f"largest_solved/{name}/seed{seed}/{len(tried)}{DEFAULTS_TAG}"
        if key not in _done_keys(False):
            _write({"key": key, "bench": "largest_solved", "algo": name, "seed": seed, "largest_solved": largest,
                    "sizes_tried": tried, "first_failed": first_failed,
                    "complete": first_failed is not None or (bool(tried) and max(tried) >= max_size)})


def _unseen_diagnostics(learner: Any, size: int, visited: Any) -> dict[str, Any]:
    """Epistemic std of Q (a Delta Variance, sqrt(∇_θQᵀ Σ ∇_θQ) averaged over both actions), of the
    right-left gap Q(s, 1) − Q(s, 0), and the fraction of first-layer units with a positive
    pre-activation (the activation's input, after the norm if any), over the reachable cells (row >= column) seen so far and those not yet seen."""
    import torch

    from algorithms.eve.losses import q_epistemic_variance, q_gradients
    from algorithms.uncertainty import module_fn, module_params

    q = learner.module["default_policy"].unwrapped().q
    cov = learner.fisher.covariance(float(learner.replay.num_transitions))
    params = module_params(q)
    cells = torch.eye(size * size)
    reachable = torch.tensor([i // size >= i % size for i in range(size * size)])
    out: dict[str, Any] = {}
    for name, mask in (("seen", visited & reachable), ("unseen", ~visited & reachable)):
        out[f"{name}_cells"] = int(mask.sum())
        if not mask.any():
            continue
        obs = cells[mask]
        grads = [q_gradients(module_fn(q), params, obs, torch.full((len(obs),), a)) for a in (0, 1)]
        std = torch.stack([q_epistemic_variance(g, cov, params).clamp_min(0).sqrt() for g in grads])
        gap = q_epistemic_variance(grads[1] - grads[0], cov, params).clamp_min(0).sqrt()
        with torch.no_grad():
            block = q.blocks[0]  # the activation's input: after the norm when there is one (all towers)
            pre = block.norm(block.layer(obs))
        out.update({f"{name}_q_std": float(std.mean()), f"{name}_gap_std": float(gap.mean()),
                    f"{name}_active_units": float((pre > 0).float().mean())})
    return out


def measure_core(sizes: list[int], seed: int, activation: str, q_heads: str, minutes: float, force: bool,
                 overrides: dict[str, Any] | None = None, network: dict[str, Any] | None = None) -> None:
    """EVE's runner and learner in this process (algorithms.offpolicy.inprocess, no Ray), one size at a
    time: stop when solved (bsuite's rule) or at the episode budget; every 500 episodes a progress line
    with :func:`_unseen_diagnostics`. ``minutes`` caps a size (then ``finished`` is false).
    ``overrides``: further ``EVEConfig.training`` settings (``--set key=value``); ``network``: the spec's
    ``network`` block for the Q network (``--network``, replaces ``activation``); both are part of the key."""
    overrides = dict(overrides or {})
    import torch

    from algorithms.diagnostics.bsuite_scoring import BsuiteEpisodeLog, deep_sea_episode_budget
    from algorithms.eve.config import EVEConfig
    from algorithms.offpolicy.inprocess import build_runner_and_learner, core_step

    lines = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()] if RESULTS.exists() else []
    finished = set() if force else {x["key"] for x in lines if x.get("bench") == "core_deep_sea" and x.get("finished")}
    for size in sizes:
        index = (size - 10) // 2
        bid = f"deep_sea/{index}"
        cfg = (EVEConfig().environment(f"bsuite/deep_sea-{index}").debugging(seed=seed)
               .training(activation=activation, **({"q_heads": q_heads} if q_heads else {}), **overrides))
        if network:
            cfg.rl_module(model_config={"network": network})
        named = {k: getattr(cfg, k) for k in CORE_KEY_BASELINE if k != "q_heads"}
        if network:  # the network block replaces norm
            named.pop("norm")
        named = {k: v for k, v in named.items() if v != CORE_KEY_BASELINE[k]}
        settings = {**named, **{k: v for k, v in overrides.items() if k not in CORE_KEY_BASELINE}}
        tag = "".join(f"/{k}={v}" for k, v in sorted(settings.items()))
        if network:
            tag += "/network=" + ",".join(f"{k}:{v}" for k, v in sorted(network.items()))
        key = f"core/EVE/{activation}/{cfg.q_heads}{tag}/deep_sea-{index}/seed{seed}"
        if key in finished:  # a size cut short by --minutes runs again
            continue
        runner, learner = build_runner_and_learner(cfg)
        log = BsuiteEpisodeLog()
        visited = torch.zeros(size * size, dtype=torch.bool)
        budget, t0, reported = deep_sea_episode_budget(size), time.perf_counter(), 0
        common = {"bench": "core_deep_sea", "algo": "EVE", "activation": activation, "q_heads": cfg.q_heads,
                  "size": size, "seed": seed, **({"overrides": settings} if settings else {}),
                  **({"network": network} if network else {})}
        while (not log.solved(bid) and log.num_episodes(bid) < budget
               and time.perf_counter() - t0 < 60 * minutes):
            core_step(runner, learner, cfg, 1)
            for env in runner.envs:
                for record in env.drain():
                    log.add_info(record["bsuite_id"], record)
            episodes = log.num_episodes(bid)
            if episodes >= reported + 500:
                reported = episodes
                n = len(learner.replay)
                visited |= (learner.replay.storage["obs"][:n].reshape(n, -1) > 0.5).any(0)[: size * size]
                bad = log.episode_values(bid, "bad")
                _write({**common, "key": f"{key}/progress/{episodes}", "bench": "core_progress",
                        "episodes": episodes, "seconds": time.perf_counter() - t0,
                        "bad_fraction": sum(bad) / len(bad), "good_last_500": int(len(bad[-500:]) - sum(bad[-500:])),
                        **_unseen_diagnostics(learner, size, visited)})
        solved = log.solved(bid)
        _write({**common, "key": key, "finished": solved or log.num_episodes(bid) >= budget, "solved": solved,
                "solved_episode": log.solved_episode(bid) if solved else None, "episodes": log.num_episodes(bid),
                "budget_episodes": budget, "seconds": time.perf_counter() - t0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="throughput,deep_sea")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations (1000 env steps each) per algorithm")
    ap.add_argument("--max-size", type=int, default=30)
    ap.add_argument("--deadline-min", type=float, default=60.0, help="stop starting/continuing runs after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--fragment", type=int, default=1, help="rollout_fragment_length of EVE and the baseline "
                    "in the throughput part (EVE's default is 1)")
    ap.add_argument("--sizes", default="20", help="deep_sea sizes of the core part (comma list)")
    ap.add_argument("--activation", default="elu", help="EVE's Q-network activation in the core part")
    ap.add_argument("--q-heads", default=None, help="EVE's q_heads in the core part (default: EVEConfig's)")
    ap.add_argument("--minutes", type=float, default=40.0, help="cap per size in the core part")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="further EVEConfig.training setting of the core part (repeatable; value parsed as YAML)")
    ap.add_argument("--network", default=None, metavar="YAML",
                    help="network block of EVE's Q network in the core part, e.g. '{hidden: [64], activation: elu, norm: layer}'")
    args = ap.parse_args()
    import yaml

    overrides = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml.safe_load(v)
    import torch

    torch.set_num_threads(1)
    from orchestration.runner import init_ray
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    what = set(args.what.split(","))
    if "core" in what:
        measure_core([int(x) for x in args.sizes.split(",")], args.seed, args.activation, args.q_heads,
                     args.minutes, args.force, overrides, yaml.safe_load(args.network) if args.network else None)
    if not what & {"throughput", "deep_sea"}:
        return
    init_ray(num_cpus=2)
    deadline = time.time() + 60 * args.deadline_min
    if "throughput" in what:
        measure_throughput(args.iters, args.seed, args.force, args.fragment)
    if "deep_sea" in what:
        measure_deep_sea(args.max_size, args.seed, deadline, args.force)


if __name__ == "__main__":
    main()
