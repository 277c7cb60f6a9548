"""WPO on our off-policy core vs RLlib's SAC vs a bare PyTorch loop doing WPO's updates.

Same env, seed, network sizes (256-256-256) and samples per insert (32, batch 256: one update every 8
env steps) for all three. Parts (``--parts``):

- ``throughput``: env steps/s and updates/s *with training*, measured over ``--window`` env steps after
  learning starts (1000 env steps), for ``wpo`` (RLlib Algorithm on the core), ``sac`` (RLlib SAC, new
  API stack, training_intensity 32) and ``bare`` (no RLlib: gymnasium env, TensorReplay, the same
  networks and ``wpo_loss``, Adam, clipping, hard target copies; the limit for the core). The ratio
  ``wpo / bare`` is reported (goal >= 0.8).
- ``learning``: ``env/episode_return_mean`` every iteration up to ``--learning-steps`` env steps for
  ``--algos`` (default wpo and sac), written as measured; a checkpoint per algorithm lets an
  interrupted run resume where it stopped. ``wpo`` runs WPOConfig's defaults (the critic sees
  clip(a, −1, 1), as in the reference code); ``wpo_unclipped`` feeds the critic unclipped actions (the
  default before 2026-11-26, when the unsquashed policy mean drifted to |μ| ≈ 32); ``wpo_penalty`` is
  ``wpo_unclipped`` with ``action_penalty`` = 1 (the mean is pulled back into the action bounds);
  ``wpo_spi128_n5``: 4x the updates per env step (samples per insert 128) with N = M = 5 action
  samples instead of 20, about the same compute per env step.
- ``evaluate``: the current learning checkpoint of each of ``--algos`` (a copy, so a running learning
  process may keep writing), ``--eval-episodes`` episodes with the deterministic action (the Gaussian
  mean for WPO, tanh of the mean for SAC; ``orchestration.evaluate``), recorded at the env steps of the
  algorithm's last ``learning`` line. The learning part reports the *training* episodes' return, which
  for WPO includes its exploration noise (std ~0.5 under the reference KL bound on σ).

Every result is one JSON line appended to ``--out`` (default benchmarks/results/wpo_vs_sac.jsonl) as
soon as it is measured; entries already there (same part, algo, env, seed and budget) are skipped.

    python benchmarks/wpo_vs_sac.py --parts throughput --window 400
    python benchmarks/wpo_vs_sac.py --parts learning --algos wpo --learning-steps 100000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "wpo_vs_sac.jsonl"
HIDDEN = [256, 256, 256]
SPI, BATCH, LEARNING_STARTS = 32.0, 256, 1000
# WPO variants (config overrides of the reference settings): "wpo" is WPOConfig's defaults (the critic
# sees clip(a, -1, 1), as the reference code); the others were measured before that default existed.
WPO_ARMS = {
    "wpo": {},
    "wpo_unclipped": {"critic_clip_actions": False},
    "wpo_penalty": {"critic_clip_actions": False, "action_penalty": 1.0},
    # 4x the updates per env step at about the same cost per env step: N = M = 5 action samples
    "wpo_spi128_n5": {"samples_per_insert": 128.0, "num_action_samples": 5, "num_target_action_samples": 5},
}


def _done(out: Path) -> list[dict]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _key(r: dict) -> tuple:
    return (r["part"], r["algo"], r["env"], r["seed"], r.get("budget"), r.get("env_steps"))


def _emit(out: Path, record: dict) -> None:
    record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host_cpus": os.cpu_count(),
              "machine": platform.machine(), "load_avg_1m": os.getloadavg()[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------
# configs


def wpo_config(env: str, seed: int, iteration_steps: int, hidden: list[int], **overrides):
    from algorithms.wpo.config import WPOConfig

    settings = dict(policy_hidden=hidden, critic_hidden=hidden, samples_per_insert=SPI,
                    train_batch_size_per_learner=BATCH, learning_starts=LEARNING_STARTS)
    cfg = WPOConfig().environment(env).training(**{**settings, **overrides}).debugging(seed=seed)
    cfg.min_sample_timesteps_per_iteration = iteration_steps
    return cfg


def sac_config(env: str, seed: int, iteration_steps: int, hidden: list[int]):
    from ray.rllib.algorithms.sac import SACConfig

    import algorithms.envs  # noqa: F401

    cfg = (SACConfig().environment(env)
           .training(training_intensity=SPI, train_batch_size_per_learner=BATCH,
                     num_steps_sampled_before_learning_starts=LEARNING_STARTS,
                     replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": 1_000_000})
           .rl_module(model_config={"fcnet_hiddens": hidden})
           .env_runners(num_env_runners=0, rollout_fragment_length=1)
           .reporting(min_sample_timesteps_per_iteration=iteration_steps)
           .debugging(seed=seed))
    return cfg


# ------------------------------------------------------------------------------------------------
# bare loop


def bare_wpo(env_id: str, seed: int, total_steps: int, hidden: list[int], window_start: int) -> dict[str, float]:
    """WPO's updates without RLlib; returns throughput over env steps [window_start, total_steps)."""
    import gymnasium as gym
    import numpy as np
    import torch

    import algorithms.envs  # noqa: F401
    from algorithms.offpolicy.module import update_target_networks
    from algorithms.offpolicy.ratio import updates_due
    from algorithms.offpolicy.replay import TensorReplay
    from algorithms.wpo.config import WPOConfig
    from algorithms.wpo.learner import WPOSettings, wpo_loss
    from algorithms.wpo.module import GaussianPolicy, QCritic, reference_mlp

    defaults = WPOConfig()
    torch.manual_seed(seed)
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    policy = GaussianPolicy(reference_mlp(obs_dim, hidden, 2 * act_dim), act_dim, defaults.init_scale)
    critic = QCritic(reference_mlp(obs_dim + act_dim, hidden, 1))
    target_policy, target_critic = copy.deepcopy(policy), copy.deepcopy(critic)
    for p in list(target_policy.parameters()) + list(target_critic.parameters()):
        p.requires_grad_(False)
    la_m, la_s = torch.tensor(defaults.init_log_alpha_mean), torch.tensor(defaults.init_log_alpha_stddev)
    opt_pi = torch.optim.Adam(policy.parameters(), lr=defaults.lr)
    opt_q = torch.optim.Adam(critic.parameters(), lr=defaults.lr)
    replay = TensorReplay(defaults.replay_capacity, 1, (obs_dim,), (act_dim,), n_step=defaults.n_step,
                          gamma=defaults.gamma, seed=seed)
    settings = WPOSettings.from_config(defaults)
    gen = torch.Generator().manual_seed(seed + 1)
    obs, _ = env.reset(seed=seed)
    updates, t_start, u_start = 0, None, 0
    for step in range(total_steps):
        if step == window_start:
            t_start, u_start = time.perf_counter(), updates
        with torch.no_grad():
            mean, std = policy(torch.as_tensor(obs[None], dtype=torch.float32))
            action = (mean + std * torch.randn(mean.shape, generator=gen))[0].numpy()
        nxt, r, term, trunc, _ = env.step(action)
        replay.add(obs[None], action[None], np.float32([r]), nxt[None], np.array([term]), np.array([trunc]))
        obs = env.reset()[0] if (term or trunc) else nxt
        for _ in range(updates_due(step + 1, BATCH, SPI, updates, LEARNING_STARTS)):
            loss, _ = wpo_loss(policy, critic, target_policy, target_critic, la_m, la_s, replay.sample(BATCH),
                               settings, gen)
            opt_pi.zero_grad(set_to_none=True)
            opt_q.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), defaults.grad_clip)
            torch.nn.utils.clip_grad_norm_(critic.parameters(), defaults.grad_clip)
            opt_pi.step()
            opt_q.step()
            updates += 1
            if updates % defaults.target_update_period == 0:
                update_target_networks([(policy, target_policy), (critic, target_critic)], 1.0)
    dt = time.perf_counter() - t_start
    return {"env_steps_per_s": (total_steps - window_start) / dt, "updates_per_s": (updates - u_start) / dt,
            "updates": updates - u_start, "seconds": dt}


# ------------------------------------------------------------------------------------------------
# RLlib runs


def rllib_throughput(name: str, env: str, seed: int, window: int, hidden: list[int]) -> dict[str, float]:
    make = wpo_config if name == "wpo" else sac_config
    algo = make(env, seed, window, hidden).build_algo()
    try:
        steps = 0
        while steps < LEARNING_STARTS + BATCH:  # fill the replay past learning starts (a few updates run)
            steps = algo.train()["env_runners"]["num_env_steps_sampled_lifetime"]
        t0 = time.perf_counter()
        result = algo.train()
        dt = time.perf_counter() - t0
        steps = result["env_runners"]["num_env_steps_sampled"]
        learners = result.get("learners", {}).get("default_policy", {})
        out = {"env_steps_per_s": steps / dt, "seconds": dt, "env_steps": int(steps)}
        if name == "wpo":
            out["updates_per_s"] = result["system"]["updates_per_s"]
        elif "num_module_steps_trained" in learners:
            out["updates_per_s"] = learners["num_module_steps_trained"] / BATCH / dt
        return out
    finally:
        algo.stop()


def learning(name: str, env: str, seed: int, budget: int, hidden: list[int], out: Path, done: set,
             ckpt_dir: Path) -> None:
    from ray.rllib.algorithms.algorithm import Algorithm

    ckpt = ckpt_dir / f"{name}_{env.replace('/', '_')}_s{seed}"
    if (ckpt / "rllib_checkpoint.json").exists():
        algo = Algorithm.from_checkpoint(str(ckpt))
    else:
        if name in WPO_ARMS:
            cfg = wpo_config(env, seed, 5000, hidden, **WPO_ARMS[name])
        else:
            cfg = sac_config(env, seed, 5000, hidden)
        if name.startswith("wpo"):
            cfg.checkpoint_replay = True  # resume exactly where the interrupted run stopped
        else:
            cfg.training(store_buffer_in_checkpoints=True)
        algo = cfg.build_algo()
    try:
        t0 = time.perf_counter()
        while True:
            result = algo.train()
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            record = {"part": "learning", "algo": name, "env": env, "seed": seed, "budget": budget,
                      "env_steps": steps, "episode_return_mean": result["env_runners"].get("episode_return_mean"),
                      "wall_s_this_session": time.perf_counter() - t0}
            if _key(record) not in done:
                _emit(out, record)
            algo.save(str(ckpt))
            if steps >= budget:
                break
    finally:
        algo.stop()


def evaluate(name: str, env: str, seed: int, budget: int, episodes: int, out: Path, done: set,
             ckpt_dir: Path) -> None:
    import shutil

    from orchestration.evaluate import evaluate_checkpoint

    ckpt = ckpt_dir / f"{name}_{env.replace('/', '_')}_s{seed}"
    learned = [r for r in _done(out) if r["part"] == "learning" and r["algo"] == name and r["env"] == env
               and r["seed"] == seed and r.get("budget") == budget]
    if not (ckpt / "rllib_checkpoint.json").exists() or not learned:
        print(f"no learning checkpoint for {name} on {env} (seed {seed}) in {ckpt_dir}", flush=True)
        return
    record = {"part": "eval", "algo": name, "env": env, "seed": seed, "budget": budget,
              "env_steps": max(r["env_steps"] for r in learned)}
    if _key(record) in done:
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = Path(tmp) / ckpt.name
        shutil.copytree(ckpt, copy_dir)
        res = evaluate_checkpoint(copy_dir, episodes=episodes, seed=10_000 + seed, log=False)
    m = res.metrics()
    _emit(out, {**record, "eval_episodes": episodes,
                "eval_return_mean": m["eval/checkpoint/episode_return_mean"],
                "eval_return_std": m["eval/checkpoint/episode_return_std"], "deterministic": True})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="throughput", help="comma list: throughput,learning,evaluate")
    p.add_argument("--algos", default=None, help="comma list of wpo,sac,bare (default: all for throughput, "
                   "wpo,sac for learning)")
    p.add_argument("--env", default="dmc/cartpole-swingup")
    p.add_argument("--seeds", default="0")
    p.add_argument("--window", type=int, default=400, help="env steps timed with training (throughput)")
    p.add_argument("--learning-steps", type=int, default=100_000)
    p.add_argument("--eval-episodes", type=int, default=5, help="deterministic episodes (evaluate part)")
    p.add_argument("--hidden", default="256,256,256", help="widths of every MLP (all algorithms)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPUs given to the process)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--ckpt-dir", default=str(Path(tempfile.gettempdir()) / "wpo_vs_sac_ckpt"),
                   help="checkpoints of the learning part (resume point)")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {_key(r) for r in _done(out)}
    hidden = [int(w) for w in args.hidden.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    ray_started = False

    def ensure_ray() -> None:
        nonlocal ray_started
        if not ray_started:
            from orchestration.runner import init_ray

            init_ray(num_cpus=max(2, args.threads))
            ray_started = True

    common = {"hidden": hidden, "spi": SPI, "batch": BATCH, "threads": args.threads}
    if "throughput" in parts:
        algos = (args.algos or "bare,wpo,sac").split(",")
        for seed in seeds:
            for name in algos:
                record = {"part": "throughput", "algo": name, "env": args.env, "seed": seed, "budget": args.window,
                          **common}
                if _key(record) in done:
                    continue
                if name == "bare":
                    m = bare_wpo(args.env, seed, LEARNING_STARTS + BATCH + args.window, hidden, LEARNING_STARTS + BATCH)
                else:
                    ensure_ray()
                    m = rllib_throughput(name, args.env, seed, args.window, hidden)
                _emit(out, {**record, **m})
            rows = {r["algo"]: r for r in _done(out) if r["part"] == "throughput" and r["env"] == args.env
                    and r["seed"] == seed and r.get("budget") == args.window}
            if "wpo" in rows and "bare" in rows:
                ratio = {"part": "throughput_ratio", "algo": "wpo/bare", "env": args.env, "seed": seed,
                         "budget": args.window,
                         "value": rows["wpo"]["env_steps_per_s"] / rows["bare"]["env_steps_per_s"]}
                if _key(ratio) not in done:
                    _emit(out, ratio)
    if "learning" in parts:
        ensure_ray()
        for seed in seeds:
            for name in (args.algos or "wpo,sac").split(","):
                learning(name, args.env, seed, args.learning_steps, hidden, out, done, Path(args.ckpt_dir))
    if "evaluate" in parts:
        for seed in seeds:
            for name in (args.algos or "wpo,sac").split(","):
                evaluate(name, args.env, seed, args.learning_steps, args.eval_episodes, out, done,
                         Path(args.ckpt_dir))


if __name__ == "__main__":
    main()
