"""The 100k-env-step DeepMind Control protocol: WPO (our off-policy core, an RLlib Algorithm) vs Stable-Baselines3's SAC.

Agents x tasks x seeds on the platform's ``dmc/<domain>-<task>`` adapter (algorithms/envs/dmc.py: flat
float32 observations, actions in [-1, 1], 1000-step episodes), each run to ``--budget`` env steps:

- ``wpo*`` arms: WPOConfig built as a trial would be (``WPOConfig().environment(task).training(...)``), one
  env runner in the driver, ``checkpoint_replay`` on so an interrupted run resumes where it stopped.
  ``wpo_ref`` is WPOConfig's defaults (Acme's reference settings: one update of batch 256 every 8 env
  steps, N = M = 20 action samples); ``wpo`` is the candidate DMC profile (:data:`WPO_ARMS`); the others
  are ablations of it for the walker-walk contribution table.
- ``sac``: Stable-Baselines3's SAC with its defaults (256-256 MLPs, Adam 3e-4, batch 256, one update per env
  step, tau 0.005, automatic entropy) and 5,000 uniformly random steps before learning (the DMC protocol
  of the SAC and SimbaV2/BRO tables; SB3's own default is 100). Installed by the optional ``bench`` extra.

Per run and every ``--chunk`` env steps, one JSON line: the mean return of the training episodes that
ended in the chunk (the curve; WPO's include its exploration noise, SAC's its sampled actions), env
steps/s and updates/s over the chunk (wall clock of this process: compare only rows with similar
``load_avg_1m``), the lifetime update count; at every ``--eval-at`` step count the deterministic return
over ``--eval-episodes`` episodes (WPO: the Gaussian mean, through ``tanh`` under ``policy_bound:
tanh_squash``, via ``orchestration.evaluate``, the code behind ``orchestra eval``; SAC: ``predict(...,
deterministic=True)``), on env seeds 10,000 + seed + k. Finished (agent, task, seed, env_steps) lines are
skipped; a checkpoint per run after every chunk lets a killed run resume there.

    python benchmarks/dmc_100k.py --agents wpo,sac --tasks walker-walk --seeds 0
    python benchmarks/dmc_100k.py --agents wpo,sac --tasks cartpole-swingup,walker-walk,cheetah-run,walker-run,hopper-stand --seeds 0,1,2
    python benchmarks/dmc_100k.py --what throughput --agents wpo_utd1_256x2,sac --tasks walker-walk
    python benchmarks/dmc_100k.py --what table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dmc_100k.jsonl"
TASKS = ["cartpole-swingup", "walker-walk", "cheetah-run", "walker-run", "hopper-stand"]
EVAL_SEED = 10_000
SAC_RANDOM_STEPS = 5_000

# Published deterministic returns at 100k env steps (mean over seeds) that users compare against; sources
# in benchmarks/README.md (SAC: Haarnoja et al. 2018 as tabulated by Yarats et al. 2021; BRO: Nauman et
# al. 2024; SimbaV2: Lee et al. 2025).
PUBLISHED = {
    "walker-walk": {"SAC": 708, "BRO": 963, "SimbaV2": 962},
    "cartpole-swingup": {"SAC": 835, "SimbaV2": 861},
    "cheetah-run": {"SAC": 310, "BRO": 531, "SimbaV2": 642},
}

# WPO arms: overrides of WPOConfig's defaults (Acme's reference settings). ``wpo`` is the candidate DMC
# profile: one update per env step (samples per insert = batch = 256), N = M = 5 action samples (the
# sample-limited variant of experiments/wpo_dmc.yaml at twice its updates) and the tanh-squashed policy
# (docs/methods.md#wpo, "Action bounds"), so the Gaussian mean cannot leave the action bounds.
_WPO_DMC = {"samples_per_insert": 256.0, "num_action_samples": 5, "num_target_action_samples": 5,
            "policy_bound": "tanh_squash"}
WPO_ARMS: dict[str, dict] = {
    "wpo_ref": {},
    "wpo": _WPO_DMC,
    # ablations of the profile, one change each (walker-walk contribution table)
    "wpo_unbounded": {**_WPO_DMC, "policy_bound": "none"},
    "wpo_utd05": {**_WPO_DMC, "samples_per_insert": 128.0},
    # SAC's optimiser and target settings on the profile: Adam 3e-4 and Polyak targets (tau 0.005 per update)
    "wpo_sac_opt": {**_WPO_DMC, "lr": 3e-4, "target_update_period": 1, "target_update_tau": 0.005},
    # twin critics on the profile: the clipped double-Q target (docs/methods.md#wpo, "Twin critics"), as TD3/SAC
    "wpo_twin": {**_WPO_DMC, "num_critics": 2},
    # the throughput comparison with SAC: equal update-to-data ratio (1) and network sizes (256-256)
    "wpo_utd1_256x2": {**_WPO_DMC, "policy_hidden": [256, 256], "critic_hidden": [256, 256]},
}
AGENTS = [*WPO_ARMS, "sac"]


def _done(out: Path) -> list[dict]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _key(r: dict) -> tuple:
    return (r["what"], r["agent"], r["task"], r["seed"], r.get("env_steps"))


def _emit(out: Path, record: dict) -> None:
    record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host_cpus": os.cpu_count(),
              "machine": platform.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------
# WPO on the off-policy core


def wpo_config(agent: str, task: str, seed: int, chunk: int):
    from algorithms.wpo.config import WPOConfig

    cfg = (WPOConfig().environment(f"dmc/{task}").training(**WPO_ARMS[agent])
           .env_runners(num_env_runners=0).debugging(seed=seed))
    cfg.min_sample_timesteps_per_iteration = chunk
    cfg.checkpoint_replay = True
    return cfg


class WPORun:
    """One WPO run: ``advance()`` trains one chunk and checkpoints; ``evaluate()`` runs deterministic episodes."""

    def __init__(self, agent: str, task: str, seed: int, chunk: int, ckpt: Path):
        from ray.rllib.algorithms.algorithm import Algorithm

        self.ckpt = ckpt
        if (ckpt / "rllib_checkpoint.json").exists():
            self.algo = Algorithm.from_checkpoint(str(ckpt))
        else:
            self.algo = wpo_config(agent, task, seed, chunk).build_algo()
        self.env_steps = int(self.algo.env_steps_inserted)

    def advance(self) -> dict:
        t0 = time.perf_counter()
        updates0 = int(self.algo.updates_done)
        steps0 = self.env_steps
        result = self.algo.train()
        dt = time.perf_counter() - t0
        self.env_steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
        learner = result.get("learners", {}).get("default_policy", {})
        row = {"env_steps": self.env_steps,
               "train_return_mean": result["env_runners"].get("episode_return_mean"),
               "env_steps_per_s": (self.env_steps - steps0) / dt,
               "updates_per_s": (int(self.algo.updates_done) - updates0) / dt,
               "updates": int(self.algo.updates_done), "chunk_s": dt}
        for name in ("policy_mean_abs", "policy_mean_out_of_bounds", "policy_mean_saturated", "policy_std_mean"):
            if name in learner:
                row[name] = float(learner[name])
        self.algo.save(str(self.ckpt))
        return row

    def evaluate(self, episodes: int, seed: int) -> tuple[float, float]:
        from orchestration.evaluate import evaluate_checkpoint

        with tempfile.TemporaryDirectory() as tmp:  # a copy: the next chunk's save may overwrite the folder
            copy_dir = Path(tmp) / self.ckpt.name
            shutil.copytree(self.ckpt, copy_dir)
            res = evaluate_checkpoint(copy_dir, episodes=episodes, seed=EVAL_SEED + seed, log=False)
        return float(np.mean(res.returns)), float(np.std(res.returns))

    def close(self) -> None:
        self.algo.stop()


# ------------------------------------------------------------------------------------------------
# Stable-Baselines3 SAC


class SACRun:
    """SB3 SAC with its defaults on the same adapter; model and replay buffer saved after every chunk."""

    def __init__(self, task: str, seed: int, chunk: int, ckpt: Path):
        import gymnasium as gym
        from stable_baselines3 import SAC
        from stable_baselines3.common.monitor import Monitor

        import algorithms.envs  # noqa: F401 - registers dmc/

        self.task, self.chunk, self.ckpt = task, chunk, ckpt
        self.monitor = Monitor(gym.make(f"dmc/{task}"))
        model_zip, buffer = ckpt / "model.zip", ckpt / "replay.pkl"
        if model_zip.exists() and buffer.exists():
            self.model = SAC.load(str(model_zip), env=self.monitor, device="cpu")
            self.model.load_replay_buffer(str(buffer))
        else:
            self.model = SAC("MlpPolicy", self.monitor, learning_starts=SAC_RANDOM_STEPS, seed=seed, device="cpu",
                             verbose=0)
        self.env_steps = int(self.model.num_timesteps)

    def advance(self) -> dict:
        t0 = time.perf_counter()
        steps0, updates0 = self.env_steps, int(self.model._n_updates)
        episodes0 = len(self.monitor.get_episode_rewards())
        self.model.learn(total_timesteps=self.chunk, reset_num_timesteps=False, progress_bar=False)
        dt = time.perf_counter() - t0
        self.env_steps = int(self.model.num_timesteps)
        returns = self.monitor.get_episode_rewards()[episodes0:]
        row = {"env_steps": self.env_steps, "train_return_mean": float(np.mean(returns)) if returns else None,
               "train_episodes": len(returns), "env_steps_per_s": (self.env_steps - steps0) / dt,
               "updates_per_s": (int(self.model._n_updates) - updates0) / dt, "updates": int(self.model._n_updates),
               "chunk_s": dt}
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.model.save(str(self.ckpt / "model.zip"))
        self.model.save_replay_buffer(str(self.ckpt / "replay.pkl"))
        return row

    def evaluate(self, episodes: int, seed: int) -> tuple[float, float]:
        import gymnasium as gym

        env = gym.make(f"dmc/{self.task}")
        returns = []
        try:
            for k in range(episodes):
                obs, _ = env.reset(seed=EVAL_SEED + seed + k)
                total, done = 0.0, False
                while not done:
                    action, _ = self.model.predict(obs, deterministic=True)
                    obs, reward, term, trunc, _ = env.step(action)
                    total += float(reward)
                    done = term or trunc
                returns.append(total)
        finally:
            env.close()
        return float(np.mean(returns)), float(np.std(returns))

    def close(self) -> None:
        self.monitor.close()


def make_run(agent: str, task: str, seed: int, chunk: int, ckpt_dir: Path):
    ckpt = ckpt_dir / f"{agent}_{task}_s{seed}"
    if agent == "sac":
        return SACRun(task, seed, chunk, ckpt)
    return WPORun(agent, task, seed, chunk, ckpt)


# ------------------------------------------------------------------------------------------------
# parts


def learning(agent: str, task: str, seed: int, args: argparse.Namespace, out: Path) -> None:
    mine = [r for r in _done(out) if r["agent"] == agent and r["task"] == task and r["seed"] == seed]
    rows = [r for r in mine if r["what"] == "learning"]
    eval_at = sorted(int(s) for s in args.eval_at.split(","))
    evaluated = {r["eval_point"] for r in mine if r["what"] == "eval"}
    if rows and max(r["env_steps"] for r in rows) >= args.budget and set(eval_at) <= evaluated:
        return
    run = make_run(agent, task, seed, args.chunk, Path(args.ckpt_dir))
    common = {"what": "learning", "agent": agent, "task": task, "seed": seed, "budget": args.budget,
              "settings": WPO_ARMS.get(agent, {"sb3": "defaults", "learning_starts": SAC_RANDOM_STEPS})}
    try:
        done = {r["env_steps"] for r in rows}
        while True:
            for point in eval_at:  # a point the restored checkpoint already passed is evaluated there
                if run.env_steps >= point and point not in evaluated and run.env_steps > 0:
                    mean, std = run.evaluate(args.eval_episodes, seed)
                    _emit(out, {**common, "what": "eval", "env_steps": run.env_steps, "eval_point": point,
                                "eval_episodes": args.eval_episodes, "eval_return_mean": mean,
                                "eval_return_std": std, "deterministic": True})
                    evaluated.add(point)
            if run.env_steps >= args.budget:
                break
            row = run.advance()
            if row["env_steps"] not in done:
                _emit(out, {**common, **row})
    finally:
        run.close()


def throughput(agent: str, task: str, seed: int, window: int, out: Path) -> None:
    """Env steps/s and updates/s with training, over ``window`` env steps after learning starts (fresh run)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(agent, task, seed, window, Path(tmp))
        try:
            warm = SAC_RANDOM_STEPS if agent == "sac" else 1000
            while run.env_steps < warm + 256:
                run.advance()
            row = run.advance()
        finally:
            run.close()
    _emit(out, {"what": "throughput", "agent": agent, "task": task, "seed": seed, "env_steps": row["env_steps"],
                "window": window, "env_steps_per_s": row["env_steps_per_s"], "updates_per_s": row["updates_per_s"]})


def table(out: Path) -> str:
    """Markdown: deterministic return at the budget, mean ± std over seeds, per agent and task."""
    evals = [r for r in _done(out) if r["what"] == "eval"]
    budget_points = sorted({r["eval_point"] for r in evals})
    point = budget_points[-1] if budget_points else 100_000
    agents = sorted({r["agent"] for r in evals})
    lines = [f"| task | {' | '.join(agents)} | published (SAC / BRO / SimbaV2) |",
             "|---" * (len(agents) + 2) + "|"]
    for task in TASKS:
        cells = []
        for agent in agents:
            vals = [r["eval_return_mean"] for r in evals if r["agent"] == agent and r["task"] == task
                    and r["eval_point"] == point]
            cells.append(f"{np.mean(vals):.0f} ± {np.std(vals):.0f} (n={len(vals)})" if vals else "–")
        pub = PUBLISHED.get(task, {})
        lines.append(f"| {task} | {' | '.join(cells)} | "
                     f"{' / '.join(str(pub.get(k, '–')) for k in ('SAC', 'BRO', 'SimbaV2'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--what", default="learning", choices=["learning", "throughput", "table"])
    p.add_argument("--agents", default="wpo,sac", help=f"comma list of {', '.join(AGENTS)}")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=100_000, help="env steps per run")
    p.add_argument("--chunk", type=int, default=5_000, help="env steps between JSON lines and checkpoints")
    p.add_argument("--eval-at", default="50000,100000", help="env step counts with a deterministic evaluation")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--window", type=int, default=1_000, help="env steps timed (throughput)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPUs given to the process)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--ckpt-dir", default=str(ROOT / "benchmarks" / ".dmc_100k_ckpt"),
                   help="per-run checkpoints (the resume point); not tracked by git")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.what == "table":
        print(table(out))
        return
    agents = args.agents.split(",")
    unknown = sorted(set(agents) - set(AGENTS))
    if unknown:
        p.error(f"--agents: unknown {unknown}; allowed: {', '.join(AGENTS)}")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    torch.set_num_threads(args.threads)
    if any(a != "sac" for a in agents):
        from orchestration.runner import init_ray

        init_ray(num_cpus=max(2, args.threads))
    done = {_key(r) for r in _done(out)}
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks.split(","):
            for agent in agents:
                if args.what == "learning":
                    learning(agent, task, seed, args, out)
                elif ("throughput", agent, task, seed) not in {k[:4] for k in done}:
                    throughput(agent, task, seed, args.window, out)


if __name__ == "__main__":
    main()
