"""The continual MinAtar study, run a seed at a time and resumable across sessions: experiments/continual_minatar.yaml
(PPO on breakout -> freeway -> asterix, cycled every 100k env steps, 600k in all) and its fresh-agent reference
experiments/continual_minatar_fresh.yaml, for the four network methods of those specs (plain, LayerNorm, NaP,
LayerNorm + L2).

Each unit is one ``orchestra run`` of one spec for one seed (``--set seeds=[s]``: the continual spec's 4 trials
or the fresh spec's 12), exactly the command a user types, with tracking in ``--work`` (git-ignored; one MLflow
database for the whole study, so ``--what report`` can render both launches' HTML reports). When a unit's
launch ends, one JSON line per trial goes to ``--out``; units whose trials are all there are skipped, so an
interrupted study resumes at the first unfinished unit (the unit itself restarts).

Line of a continual trial: the game's windowed return at the end of each segment (``env/task_return/task_<k>``:
the mean of that game's last 20 episodes, the ``task_returns`` diagnostic), segment i covering env steps
[i·S, (i+1)·S) with S = switch_every, game k = i mod 3, cycle = i // 3; and the module-level plasticity
metrics over time. Line of a fresh trial: the same windowed return of its one game after S env steps.

Score (``--what table``), per method m, game g and cycle c:

    ratio(m, g, c) = R_cont(m, g, c, seed) / mean_seeds R_fresh(m, g)

with the mean over continual seeds and a 95% percentile-bootstrap interval over seeds
(:func:`orchestration.report.bootstrap_ci`); the denominator is the same method's fresh agent, so the ratio
measures lost plasticity, not the method's quality on a game. 1 = as good as a fresh agent.

    python benchmarks/continual_minatar.py                 # run the missing units, seeds 0,1,2
    python benchmarks/continual_minatar.py --seeds 0 --parts continual
    python benchmarks/continual_minatar.py --what table
    python benchmarks/continual_minatar.py --what report   # HTML reports of the launches in --work's MLflow
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "continual_minatar.jsonl"
DEFAULT_WORK = ROOT / "benchmarks" / ".continual_minatar"
SPECS = {"continual": ROOT / "experiments" / "continual_minatar.yaml",
         "fresh": ROOT / "experiments" / "continual_minatar_fresh.yaml"}
METHODS = ("plain", "layernorm", "nap", "ln_l2")
# Module-level plasticity metrics kept per trial (plasticity/default_policy/<name>; docs/methods.md#plasticity-metrics).
PLASTICITY = ("dormant_ratio", "effective_rank", "weight_norm", "effective_lr", "srank", "feature_norm")


def method_of(params: dict[str, str]) -> str:
    """The spec's method name of a trial, from its ``network.*`` params."""
    if params.get("network.nap") == "True":
        return "nap"
    if params.get("network.weight_decay.kind") == "l2":
        return "ln_l2" if params.get("network.norm") == "layer" else "l2"
    return "layernorm" if params.get("network.norm") == "layer" else "plain"


def load_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_trials(part: str) -> int:
    import yaml

    spec = yaml.safe_load(SPECS[part].read_text())
    n = len(spec["config"]["network"]["grid"])
    start = spec["config"]["env_config"].get("start_step")
    return n * (len(start["grid"]) if isinstance(start, dict) else 1)


def unit_done(lines: list[dict[str, Any]], part: str, seed: int) -> bool:
    return sum(1 for r in lines if r["part"] == part and r["seed"] == seed) >= expected_trials(part)


def value_at(hist: np.ndarray, step: float) -> tuple[float, int] | None:
    """Value of the last logged point at or before ``step`` (hist: [(step, value), ...] sorted)."""
    if hist is None or len(hist) == 0:
        return None
    idx = np.searchsorted(hist[:, 0], step, side="right") - 1
    if idx < 0:
        return None
    return float(hist[idx, 1]), int(hist[idx, 0])


def trial_lines(uri: str, experiment: str, launch: str, part: str) -> list[dict[str, Any]]:
    """One JSON line per finished trial of ``launch`` (see the module docstring)."""
    from mlflow import MlflowClient

    from orchestration.report import load_experiment, run_histories

    data = load_experiment(uri, experiment, launch=launch)
    client = MlflowClient(uri)
    hist_keys = {f"plasticity/default_policy/{m}": m for m in PLASTICITY}
    histories = {key: run_histories(data, key) for key in hist_keys}
    rows = data.runs.to_pydict()
    out = []
    for rid, status in zip(rows["run_id"], rows["status"]):
        if status != "FINISHED":
            continue
        run = client.get_run(rid)
        p = run.data.params
        games = json.loads(p["env_config.games"].replace("'", '"'))
        switch = int(p["env_config.switch_every"])
        start = int(p.get("env_config.start_step", 0) or 0)
        steps = int(float(run.data.metrics.get("env/num_env_steps_sampled_lifetime", 0)))
        task_hist = {k: run_histories(data, f"env/task_return/task_{k}").get(rid) for k in range(len(games))}
        line: dict[str, Any] = {
            "part": part, "method": method_of(p), "seed": int(p["seed"]), "games": games, "switch_every": switch,
            "env_steps": steps, "launch": launch, "run_id": rid,
            "plasticity": {name: histories[key][rid].tolist() for key, name in hist_keys.items()
                           if rid in histories[key]},
        }
        if part == "continual":
            segs = []
            for i in range(steps // switch):
                k = i % len(games)
                got = value_at(task_hist[k], (i + 1) * switch)
                segs.append({"segment": i, "game": games[k], "cycle": i // len(games), "end_step": (i + 1) * switch,
                             "return": got[0] if got else None, "logged_at": got[1] if got else None})
            line["segments"] = segs
        else:
            k = (start // switch) % len(games)
            got = value_at(task_hist[k], steps)
            line.update({"game": games[k], "start_step": start, "return": got[0] if got else None})
        out.append(line)
    return out


def run_unit(part: str, seed: int, work: Path, out: Path, extra: list[str]) -> None:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{part}_seed{seed}.log"
    cmd = [str(Path(sys.executable).parent / "orchestra"), "run", str(SPECS[part]), "--set", f"seeds=[{seed}]",
           "--set", f"tracking.uri={uri}", "--set", f"tracking.storage={work / 'ray'}",
           "--set", f"tracking.artifacts={work / 'artifacts'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/"}
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    text = log.read_text()
    m = re.search(r"^launch (\S+): ", text, re.M)
    if not m:
        print(json.dumps({"part": part, "seed": seed, "error": f"no launch line (rc {rc}); see {log}"}), flush=True)
        return
    launch = m.group(1)
    experiment = "continual_minatar" if part == "continual" else "continual_minatar_fresh"
    lines = trial_lines(uri, experiment, launch, part)
    wall = time.time() - t0
    with out.open("a") as f:
        for line in lines:
            line["unit_wall_s"] = round(wall, 1)
            f.write(json.dumps(line) + "\n")
            print(json.dumps({k: line[k] for k in ("part", "method", "seed", "env_steps")}
                             | {"return": line.get("return"),
                                "segments": [s["return"] for s in line.get("segments", [])]}), flush=True)
    if rc != 0 or len(lines) < expected_trials(part):
        print(json.dumps({"part": part, "seed": seed, "error": f"rc {rc}, {len(lines)} finished trials; see {log}"}),
              flush=True)


def table(out: Path) -> str:
    from orchestration.report import bootstrap_ci

    lines = load_lines(out)
    fresh: dict[tuple[str, str], list[float]] = {}
    for r in lines:
        if r["part"] == "fresh" and r["return"] is not None:
            fresh.setdefault((r["method"], r["game"]), []).append(r["return"])
    cont = [r for r in lines if r["part"] == "continual"]
    if not cont:
        return "no continual trials measured yet"
    games = cont[0]["games"]
    cycles = max(s["cycle"] for r in cont for s in r["segments"]) + 1
    methods = [m for m in METHODS if any(r["method"] == m for r in cont)]
    md = ["| method | seeds | " + " | ".join(f"{g} c{c + 1}" for c in range(cycles) for g in games) + " |",
          "|---|---|" + "---|" * (cycles * len(games))]
    raw = ["| method | " + " | ".join(f"{g} fresh" for g in games) + " | "
           + " | ".join(f"{g} c{c + 1}" for c in range(cycles) for g in games) + " |",
           "|---|" + "---|" * (len(games) + cycles * len(games))]
    for m in methods:
        runs = [r for r in cont if r["method"] == m]
        cells, rawcells = [], []
        for g in games:
            f = fresh.get((m, g), [])
            rawcells.append(f"{np.mean(f):.2f} (n={len(f)})" if f else "-")
        for c in range(cycles):
            for g in games:
                vals = [s["return"] for r in runs for s in r["segments"]
                        if s["game"] == g and s["cycle"] == c and s["return"] is not None]
                f = fresh.get((m, g), [])
                rawcells.append(f"{np.mean(vals):.2f}" if vals else "-")
                if not vals or not f or abs(np.mean(f)) < 1e-6:
                    cells.append("-")
                    continue
                ratios = np.asarray(vals) / np.mean(f)
                lo, hi = bootstrap_ci(ratios)
                cells.append(f"{ratios.mean():.2f} [{lo:.2f}, {hi:.2f}]")
        md.append(f"| {m} | {len(runs)} | " + " | ".join(cells) + " |")
        raw.append(f"| {m} | " + " | ".join(rawcells) + " |")
    # Plasticity metrics at the end of each segment, mean over seeds.
    segs = max(len(r["segments"]) for r in cont)
    pl = ["| method | metric | " + " | ".join(f"{(i + 1) * cont[0]['switch_every'] // 1000}k" for i in range(segs))
          + " |", "|---|---|" + "---|" * segs]
    for m in methods:
        runs = [r for r in cont if r["method"] == m]
        for name in ("dormant_ratio", "effective_rank", "weight_norm", "effective_lr"):
            row = []
            for i in range(segs):
                vals = []
                for r in runs:
                    h = np.asarray(r["plasticity"].get(name, []), dtype=float)
                    got = value_at(h, (i + 1) * r["switch_every"]) if h.size else None
                    if got:
                        vals.append(got[0])
                row.append(f"{np.mean(vals):.3g}" if vals else "-")
            pl.append(f"| {m} | {name} | " + " | ".join(row) + " |")
    return ("Return relative to the same method's fresh agent (mean over seeds [95% bootstrap CI]):\n\n"
            + "\n".join(md) + "\n\nRaw windowed returns (mean over seeds):\n\n" + "\n".join(raw)
            + "\n\nPlasticity metrics at the end of each segment (policy module, mean over seeds):\n\n"
            + "\n".join(pl))


def report(work: Path, out_dir: Path) -> None:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    for experiment in ("continual_minatar", "continual_minatar_fresh"):
        cmd = [str(Path(sys.executable).parent / "orchestra"), "report", experiment, "--uri", uri, "--html",
               "--out", str(out_dir / experiment)]
        subprocess.run(cmd, check=False, cwd=ROOT)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", default="run", choices=["run", "table", "report"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parts", default="continual,fresh")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--report-dir", type=Path, default=ROOT / "benchmarks" / "results" / "continual_minatar_report")
    ap.add_argument("--set", action="append", default=[], dest="sets",
                    help="extra --set overrides passed to orchestra run (a shortened study: stop.steps=..., "
                         "config.env_config.switch_every=...); use with a separate --out")
    args = ap.parse_args(argv)
    if args.what == "table":
        print(table(args.out))
        return
    if args.what == "report":
        report(args.work, args.report_dir)
        return
    extra = [x for s in args.sets for x in ("--set", s)]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for part in args.parts.split(","):
            if unit_done(load_lines(args.out), part, seed):
                continue
            run_unit(part, seed, args.work, args.out, extra)


if __name__ == "__main__":
    main()
