"""Overhead of diagnostic ``plasticity`` on PPO CartPole iterations, side by side.

Three PPO algorithms (same config and seed) are trained in lock-step, one iteration each per round:
no callback (baseline), the plasticity callback at every=10, and at every=1 (defaults otherwise:
probe_size 512, τ = 0.025, ranks, weights, gradients and drift on, Hessian off). Interleaving puts
all three under the same machine load.

Per configuration one JSON line (printed and appended to benchmarks/results/plasticity_overhead.jsonl):
- ``mean_iter_s``: mean wall time of ``algo.train()`` (includes the callback) over the timed rounds;
- ``overhead_end_to_end``: mean_iter_s / baseline mean_iter_s − 1 (noisy on a loaded machine);
- ``overhead_cpu``: the same ratio on this process's CPU time (``time.process_time``; with
  num_env_runners=0 and num_learners=0 sampling and learning run in this process), robust to load
  from other processes;
- ``callback_s_per_fire``: mean of ``plasticity/compute_s`` (time inside the callback when it fires);
- ``overhead_direct``: callback_s_per_fire / every / baseline mean_iter_s, the fraction of
  iteration time spent in the callback averaged over iterations (the number the < 5% target is about).
Lines already in the results file with the same configuration key (commit of the code included) are
skipped (use --force to redo).

Usage: .venv/bin/python benchmarks/plasticity_overhead.py [--iters 20] [--train-batch 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_REPORT_URL", "http://127.0.0.1:9/")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "plasticity_overhead.jsonl"


def key_of(line: dict) -> tuple:
    return (line["bench"], line.get("commit"), line["algo"], line["env"], line["every"], line["probe_size"],
            line["iters"], line["train_batch"], line["minibatch"], line["epochs"])


def git_commit() -> str | None:
    """The last commit that changed the measured code (part of the skip key: new code is measured again)."""
    import subprocess

    paths = ["algorithms/diagnostics/plasticity.py", "algorithms/diagnostics/probe.py",
             "algorithms/diagnostics/rllib_plasticity.py"]
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--", *paths], cwd=ROOT,
                             capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20, help="timed rounds (every=10 fires iters/10 times)")
    ap.add_argument("--train-batch", type=int, default=1000)
    ap.add_argument("--minibatch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--probe-size", type=int, default=512)
    ap.add_argument("--force", action="store_true", help="measure even if the results file has the line")
    args = ap.parse_args()

    everies = [None, 10, 1]
    base = {"bench": "plasticity_overhead", "commit": git_commit(), "algo": "PPO", "env": "CartPole-v1", "probe_size": args.probe_size,
            "iters": args.iters, "train_batch": args.train_batch, "minibatch": args.minibatch,
            "epochs": args.epochs}
    done = set()
    if RESULTS.exists() and not args.force:
        for raw in RESULTS.read_text().splitlines():
            if raw.strip():
                done.add(key_of(json.loads(raw)))
    todo = [e for e in everies if key_of({**base, "every": e}) not in done]
    if not todo:
        print(f"all lines already measured in {RESULTS}", file=sys.stderr)
        return
    if None not in todo:
        todo = [None, *todo]  # the baseline is needed for the ratios

    import ray
    import torch
    from ray.rllib.algorithms.ppo import PPOConfig

    from algorithms.diagnostics.rllib_plasticity import make_plasticity_callback

    for attempt in range(6):  # a loaded machine can make the local node miss its startup deadline
        try:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, log_to_driver=False)
            break
        except Exception:
            if attempt == 5:
                raise
            ray.shutdown()
            time.sleep(20)
    algos = {}
    for every in todo:
        cfg = (
            PPOConfig()
            .environment("CartPole-v1")
            .env_runners(num_env_runners=0)
            .training(train_batch_size=args.train_batch, minibatch_size=args.minibatch, num_epochs=args.epochs)
            .debugging(seed=0)
        )
        if every is not None:
            cfg = cfg.callbacks(callbacks_class=[make_plasticity_callback({"every": every,
                                                                            "probe_size": args.probe_size})])
        algos[every] = cfg.build()

    for algo in algos.values():  # warm-up round, not timed (first-iteration costs)
        algo.train()
    times = {e: [] for e in algos}
    compute = {e: [] for e in algos}
    cpu = {e: [] for e in algos}
    for i in range(args.iters):
        for every, algo in algos.items():
            t0, c0 = time.perf_counter(), time.process_time()
            r = algo.train()
            times[every].append(time.perf_counter() - t0)
            cpu[every].append(time.process_time() - c0)
            if "plasticity/compute_s" in r:
                compute[every].append(r["plasticity/compute_s"])
        print(f"round {i + 1}/{args.iters}: " + ", ".join(f"every={e}: {t[-1]:.2f}s" for e, t in times.items()),
              file=sys.stderr, flush=True)
    for algo in algos.values():
        algo.stop()
    ray.shutdown()

    baseline = statistics.mean(times[None])
    baseline_cpu = statistics.mean(cpu[None])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for every in todo:
        line = {**base, "every": every, "mean_iter_s": statistics.mean(times[every]),
                "median_iter_s": statistics.median(times[every]), "baseline_mean_iter_s": baseline,
                "mean_iter_cpu_s": statistics.mean(cpu[every]), "baseline_mean_iter_cpu_s": baseline_cpu}
        if every is not None:
            per_fire = statistics.mean(compute[every]) if compute[every] else float("nan")
            line.update({
                "fires": len(compute[every]),
                "overhead_end_to_end": line["mean_iter_s"] / baseline - 1.0,
                "overhead_cpu": line["mean_iter_cpu_s"] / baseline_cpu - 1.0,
                "callback_s_per_fire": per_fire,
                "overhead_direct": per_fire / every / baseline,
            })
        line.update({"torch": torch.__version__, "ray": ray.__version__, "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                     "load_avg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if key_of(line) in done:
            continue
        text = json.dumps(line)
        print(text)
        with open(RESULTS, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
