"""The GPU check (``make gpu-check``): every accelerator path the platform has, in a few minutes on one GPU.

Without CUDA it prints why and exits 0 without running anything (``--device cpu`` runs the same checks on
the CPU, small, to exercise the script itself). Each figure is one JSON line appended to
``--out`` (default benchmarks/results/gpu_check.jsonl) and printed as soon as it is measured:

- ``wpo_learner`` / ``eve_learner``: an RLlib Algorithm of the off-policy core with its learner on the
  device (``num_gpus_per_learner=1``: RLlib places the module on ``cuda:0``) and its replay on the
  device (``replay_device``), trained for ``--iters`` iterations: env steps/s, updates/s, the module's
  device and ``torch.cuda.max_memory_allocated``. WPO on dmc/cartpole-swingup (one update per env step,
  256-256-256 networks), EVE on bsuite/deep_sea-0 (its defaults).
- ``replay_sample``: ``TensorReplay`` storage on the device: samples/s of batch 256 with 5-step returns.
- ``meta_memory``: one DataRater meta-gradient step (benchmarks/mixflow_memory.py's ``lm_tokens`` problem,
  T inner steps) with ``reverse`` and ``mixflow`` on the device: peak memory from
  ``torch.cuda.max_memory_allocated`` above the memory held before the step, and wall time; the ratio
  reverse / mixflow is MixFlow-MG's memory claim (Kemaev et al. 2025 report > 10x on accelerators).

Not in the check yet, because the platform does not have them on a device: seed-packed trials
(``pack_seeds`` does not exist yet) and the DataRater population step (its inner members have no device
placement; algorithms/datarater/meta_training.py).

    make gpu-check
    .venv/bin/python benchmarks/gpu_check.py --device cpu --iters 1 --iter-steps 300 --T 2 --model lm   # the script, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.jsonl"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _emit(out: Path, record: dict) -> None:
    import torch

    record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def learner_check(name: str, device: str, iters: int, iter_steps: int) -> dict:
    """Train an off-policy core Algorithm with its learner and replay on ``device``; throughput and memory."""
    gpus = 1 if device == "cuda" else 0
    if name == "wpo_learner":
        from algorithms.wpo.config import WPOConfig

        cfg = (WPOConfig().environment("dmc/cartpole-swingup")
               .training(samples_per_insert=256.0, learning_starts=iter_steps, replay_device=device))
    else:
        from algorithms.eve.config import EVEConfig

        cfg = EVEConfig().environment("bsuite/deep_sea-0").training(replay_device=device)
    cfg.min_sample_timesteps_per_iteration = iter_steps
    cfg = cfg.env_runners(num_env_runners=0).learners(num_learners=0, num_gpus_per_learner=gpus).debugging(seed=0)
    algo = cfg.build_algo()
    try:
        algo.train()  # warm-up: learning starts, CUDA context and kernels
        _peak_reset(device)
        t0, steps0, updates0 = time.perf_counter(), int(algo.env_steps_inserted), int(algo.updates_done)
        for _ in range(iters):
            algo.train()
        dt = time.perf_counter() - t0
        module_device = str(next(algo.learner_group._learner.module["default_policy"].parameters()).device)
        return {"check": name, "device": device, "module_device": module_device,
                "env_steps_per_s": (int(algo.env_steps_inserted) - steps0) / dt,
                "updates_per_s": (int(algo.updates_done) - updates0) / dt,
                "updates": int(algo.updates_done) - updates0, "max_memory_allocated": _peak(device)}
    finally:
        algo.stop()


def replay_check(device: str, n: int) -> dict:
    import torch

    from algorithms.offpolicy.replay import TensorReplay

    capacity, obs_dim, act_dim = 100_000, 24, 6
    replay = TensorReplay(capacity, 1, (obs_dim,), (act_dim,), n_step=5, gamma=0.99, seed=0, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3001, 1, obs_dim, generator=g).to(device)
    a, r = torch.rand(3000, 1, act_dim, generator=g).to(device), torch.rand(3000, 1, generator=g).to(device)
    no = torch.zeros(1, dtype=torch.bool, device=device)
    for t in range(3000):  # one vector-env step per add, as the learner inserts
        replay.add(x[t], a[t], r[t], x[t + 1], no, no)
    replay.sample(256)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        batch = replay.sample(256)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"check": "replay_sample", "device": device, "batch_device": str(batch["obs"].device),
            "samples_per_s": n / dt, "batch": 256}


def meta_memory_check(device: str, T: int, model: str) -> list[dict]:
    import torch
    from mixflow_memory import build_problem

    from algorithms.meta import make_inner_optimizer, meta_gradient

    rows = []
    for engine in ("reverse", "mixflow"):
        inner, outer, theta, eta, batch = build_problem(model)
        theta = tuple(p.detach().to(device).requires_grad_(p.requires_grad) for p in theta)
        eta = tuple(p.detach().to(device).requires_grad_(p.requires_grad) for p in eta)
        batches = [type(b)(*(t.to(device) for t in b)) for b in (batch() for _ in range(T))]
        out_batch = type(batches[0])(*(t.to(device) for t in batch()))
        opt = make_inner_optimizer("sgd", 0.1)
        state = opt.init(theta)
        meta_gradient(inner, outer, opt, theta, state, eta, batches[:1], out_batch, engine)  # warm-up
        _peak_reset(device)
        before = torch.cuda.memory_allocated() if device == "cuda" else None
        t0 = time.perf_counter()
        r = meta_gradient(inner, outer, opt, theta, state, eta, batches, out_batch, engine)
        peak = _peak(device)
        dt = time.perf_counter() - t0
        del r
        rows.append({"check": "meta_memory", "device": device, "model": model, "T": T, "engine": engine,
                     "peak_bytes_above_start": None if peak is None else peak - before, "time_s": dt})
    if rows[0]["peak_bytes_above_start"] and rows[1]["peak_bytes_above_start"]:
        rows.append({"check": "meta_memory_ratio", "device": device, "model": model, "T": T,
                     "reverse_over_mixflow": rows[0]["peak_bytes_above_start"] / rows[1]["peak_bytes_above_start"],
                     "time_mixflow_over_reverse": rows[1]["time_s"] / rows[0]["time_s"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--iters", type=int, default=3, help="timed training iterations per learner check")
    p.add_argument("--iter-steps", type=int, default=1000, help="env steps per training iteration")
    p.add_argument("--T", type=int, default=8, help="inner steps of the meta-gradient memory check")
    p.add_argument("--model", default="lm_tokens", help="mixflow_memory.py problem (lm_tokens, lm, mlp)")
    p.add_argument("--replay-samples", type=int, default=2000)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing run. "
              "Run it on a machine with a GPU, or `--device cpu` to exercise the script.")
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)
    out = Path(args.out)
    t_start = time.perf_counter()
    _emit(out, replay_check(args.device, args.replay_samples))
    for row in meta_memory_check(args.device, args.T, args.model):
        _emit(out, row)
    from orchestration.runner import init_ray

    init_ray(num_cpus=2, num_gpus=1 if args.device == "cuda" else 0)
    for name in ("wpo_learner", "eve_learner"):
        _emit(out, learner_check(name, args.device, args.iters, args.iter_steps))
    print(f"gpu-check: done in {time.perf_counter() - t_start:.0f} s; figures appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
