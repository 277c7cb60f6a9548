"""Cost of MLflow logging on a Tune trial: our MLflowTracking vs Ray's MLflowLoggerCallback vs none.

One real RLlib PPO result stream (CartPole-v1, recorded once with ``algo.train()`` and the project's
result keys added the way ``orchestration.trainables`` adds them) is replayed by a Tune function
class trainable (as RLlib algorithms are): each step sleeps the recorded iteration time x
``--time-scale`` and returns the recorded result. The same replay runs once per mode, one after the other on one Ray instance,
each logging to a fresh SQLite store:
- ``none``: no logging callback (baseline);
- ``ours``: ``orchestration.tracking.MLflowTracking`` (project metric groups only, as in real runs);
- ``ours_all_keys``: ours with every numeric result group accepted, i.e. the same keys Ray logs;
- ``ray``: ``ray.air.integrations.mlflow.MLflowLoggerCallback`` (one ``log_metric`` call per key).

Per mode one JSON line (printed and appended to benchmarks/results/tracking_overhead.jsonl):
- ``trial_wall_s``: wall time from the trainable's setup to the end of its last step (Tune calls the
  next step only after the driver handled the previous result, so driver time spent logging shows
  up here; Tune's own ``time_total_s`` counts time inside ``step`` only and would hide it);
- ``fit_wall_s``: wall time of ``Tuner.fit()`` including the callback's final flush;
- ``hook_s``: driver time inside the logging callback's hooks, all but ``setup`` (store creation,
  reported as ``setup_s``); for ours it includes the final flush in ``on_experiment_end``;
- ``points``: metric points found in the store afterwards (so nothing is counted that was not saved).
A last ``summary`` line (also appended) gives ``overhead_vs_none`` = trial_wall_s(ours) / trial_wall_s(none) - 1 (goal
< 5%) and ``speedup_vs_ray`` = hook_s(ray) / hook_s(ours) (goal >= 10x), also per metric point.
Modes already in the results file under the same configuration key are not rerun (--force redoes).

Usage: .venv/bin/python benchmarks/tracking_overhead.py [--results 10] [--time-scale 0.05]
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
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "tracking_overhead.jsonl"
STREAM = ROOT / "benchmarks" / "results" / "ppo_cartpole_result_stream.json"
MODES = ("none", "ours", "ours_all_keys", "ray")
# Keys Tune fills in itself for every reported result; the replay must not report them.
TUNE_AUTO = {"done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s",
             "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "config",
             "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}


def plain(x: Any) -> Any:
    """JSON-safe copy of an RLlib result (numpy scalars -> Python numbers)."""
    from orchestration.tracking import as_number

    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, str | bool | int | float) or x is None:
        return x
    n = as_number(x)
    return n if n is not None else str(x)


def record_stream(iters: int) -> list[dict]:
    """Train PPO on CartPole-v1 for ``iters`` iterations and keep each result with the project keys."""
    import torch
    from ray.rllib.algorithms.ppo import PPOConfig

    from orchestration.trainables import project_result_keys

    torch.set_num_threads(1)
    algo = PPOConfig().environment("CartPole-v1").env_runners(num_env_runners=0).debugging(seed=0).build_algo()
    stream = []
    for _ in range(iters):
        result = algo.train()
        for group, values in project_result_keys(result).items():  # as OrchestraAlgorithmMixin.step
            if isinstance(values, dict) and isinstance(result.get(group), dict):
                result[group].update(values)
            else:
                result[group] = values
        stream.append(plain({k: v for k, v in result.items() if k != "config"}))
    algo.stop()
    return stream


def make_replay():
    """A Tune class trainable (like RLlib's Algorithm) that replays the recorded results: each
    ``step`` sleeps the recorded iteration time x ``time_scale`` and returns the next result. Tune
    asks a class trainable for its next step only after the driver has handled the previous result,
    so driver time spent logging lengthens the trial; ``bench/trial_wall_s`` in every result is the
    wall time since the trainable was set up."""
    from ray import tune

    class Replay(tune.Trainable):
        def setup(self, config: dict) -> None:
            self.t0 = time.time()
            self.stream = json.loads(Path(config["stream_file"]).read_text())
            self.scale = config["time_scale"]
            self.i = 0

        def step(self) -> dict:
            rec = self.stream[self.i % len(self.stream)]
            time.sleep(rec["time_this_iter_s"] * self.scale)
            out = {k: v for k, v in rec.items() if k not in TUNE_AUTO}
            # keep steps increasing when the stream is replayed more than once
            out["steps"] = rec["steps"] + (self.i // len(self.stream)) * self.stream[-1]["steps"]
            self.i += 1
            out["bench"] = {"trial_wall_s": time.time() - self.t0}
            return out

    return Replay


class Timed:
    """Forwards Tune callback hooks to ``inner`` and adds up the driver time spent in them."""

    HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore", "on_trial_save",
             "on_trial_result", "on_trial_complete", "on_trial_recover", "on_trial_error", "on_checkpoint",
             "on_experiment_end")

    @staticmethod
    def wrap(inner):
        from ray import tune

        class _Timed(tune.Callback):
            def __init__(self):
                self.inner, self.seconds = inner, {}

            def __getstate__(self):  # Tune pickles callbacks; only the live instance is timed
                return {"inner": None, "seconds": {}}

        def forward(name):
            def hook(self, *args, **kwargs):
                t0 = time.perf_counter()
                getattr(self.inner, name)(*args, **kwargs)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            return hook

        for name in Timed.HOOKS:
            setattr(_Timed, name, forward(name))
        return _Timed()


def count_points(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    total = 0
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            for key in run.data.metrics:
                total += len(client.get_metric_history(run.info.run_id, key))
    return total


def run_mode(mode: str, stream: list[dict], n_results: int, time_scale: float, workdir: Path) -> dict:
    from ray import tune

    uri = f"sqlite:///{workdir / mode / 'mlflow.db'}"
    (workdir / mode).mkdir(parents=True)
    inner = None
    if mode in ("ours", "ours_all_keys"):
        from orchestration.tracking import MLflowTracking

        extra = ()
        if mode == "ours_all_keys":
            extra = tuple(k for k, v in stream[0].items() if isinstance(v, dict)) + tuple(
                k for k, v in stream[0].items() if not isinstance(v, dict) and k not in TUNE_AUTO)
        inner = MLflowTracking(uri, "bench", f"bench-{mode}", trial_tags={"orchestra.algorithm": "PPO"},
                               extra_metric_prefixes=extra)
    elif mode == "ray":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        inner = MLflowLoggerCallback(tracking_uri=uri, experiment_name="bench")
    timed = Timed.wrap(inner) if inner is not None else None
    tuner = tune.Tuner(
        make_replay(),
        param_space={"stream_file": str(STREAM), "n_results": n_results, "time_scale": time_scale},
        run_config=tune.RunConfig(name=mode, storage_path=str(workdir / "runs"), verbose=0,
                                  stop={"training_iteration": n_results}, callbacks=[timed] if timed else []),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    fit_wall = time.perf_counter() - t0
    res = grid[0].metrics
    return {
        "trial_wall_s": round(res["bench"]["trial_wall_s"], 4),
        "fit_wall_s": round(fit_wall, 4),
        "hook_s": round(sum(v for k, v in timed.seconds.items() if k != "setup"), 4) if timed else 0.0,
        "result_hook_s": round(timed.seconds.get("on_trial_result", 0.0), 4) if timed else 0.0,
        "end_hook_s": round(timed.seconds.get("on_experiment_end", 0.0), 4) if timed else 0.0,
        "setup_s": round(timed.seconds.get("setup", 0.0), 4) if timed else 0.0,
        "points": count_points(uri) if inner is not None else 0,
        "results_reported": res["training_iteration"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=10, help="results reported per trial")
    ap.add_argument("--time-scale", type=float, default=0.05, help="x recorded PPO iteration time")
    ap.add_argument("--record-iters", type=int, default=4, help="PPO iterations recorded (first run only)")
    ap.add_argument("--force", action="store_true", help="rerun modes already in the results file")
    args = ap.parse_args()

    if not STREAM.exists():
        from orchestration.runner import init_ray

        init_ray(num_cpus=2)
        STREAM.parent.mkdir(parents=True, exist_ok=True)
        STREAM.write_text(json.dumps(record_stream(args.record_iters)))
    stream = json.loads(STREAM.read_text())
    import mlflow
    import ray

    base = {"bench": "tracking_overhead", "trainable": "class", "stream": STREAM.name, "stream_len": len(stream),
            "results": args.results, "time_scale": args.time_scale, "store": "sqlite"}
    key = json.dumps(base, sort_keys=True)
    done = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("key") == key and rec.get("mode") in MODES:
                done[rec["mode"]] = rec
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            if mode in done and not args.force:
                print(json.dumps(done[mode]), flush=True)
                continue
            from orchestration.runner import init_ray

            init_ray(num_cpus=2)
            out = {**base, "key": key, "mode": mode, **run_mode(mode, stream, args.results, args.time_scale,
                                                                   Path(tmp))}
            out.update(ray=ray.__version__, mlflow=mlflow.__version__, python=platform.python_version(),
                       cpus=os.cpu_count(), loadavg_1m=round(os.getloadavg()[0], 2),
                       time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            done[mode] = out
            with open(RESULTS, "a") as f:
                f.write(json.dumps(out) + "\n")
            print(json.dumps(out), flush=True)
    none, ours, ray_cb = done["none"], done["ours"], done["ray"]
    summary = {
        **base, "mode": "summary",
        "overhead_vs_none": round(ours["trial_wall_s"] / none["trial_wall_s"] - 1, 4),
        "overhead_vs_none_all_keys": round(done["ours_all_keys"]["trial_wall_s"] / none["trial_wall_s"] - 1, 4),
        "ray_overhead_vs_none": round(ray_cb["trial_wall_s"] / none["trial_wall_s"] - 1, 4),
        "speedup_vs_ray": round(ray_cb["hook_s"] / max(ours["hook_s"], 1e-9), 1),
        "speedup_vs_ray_same_keys": round(ray_cb["hook_s"] / max(done["ours_all_keys"]["hook_s"], 1e-9), 1),
        "speedup_vs_ray_per_point": round((ray_cb["hook_s"] / max(ray_cb["points"], 1))
                                          / max(ours["hook_s"] / max(ours["points"], 1), 1e-12), 1),
        "goal": "overhead_vs_none < 0.05 and speedup_vs_ray >= 10", "key": key,
    }
    with open(RESULTS, "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
