"""`orchestra` command line: a thin layer over orchestration's Python API.

    orchestra run SPEC [--set key=value ...] [--dry-run] [--address ADDR]
    orchestra resume NAME              continue an interrupted launch (launch name or spec name)
    orchestra validate SPEC [--set ...] check a spec without running it (names resolve)
    orchestra ls [EXPERIMENT]          experiments and runs with status and best metric
    orchestra ui [--port N]            MLflow UI on 127.0.0.1 for the configured store
    orchestra sync PATH                upload metric batches spooled while MLflow was unreachable
    orchestra report NAME [--html] [--parquet DIR]   seed aggregates, plots, HTML report
    orchestra eval CHECKPOINT [--env NAME] [--episodes K] [--video]   deterministic episodes, logged to MLflow
    orchestra validate-cluster FILE    check a `ray up` config (Ray's validator + our security rules)
    orchestra launch SPEC --cluster FILE [--set ...] [--detach]   run a spec as a Ray Job on a cluster
    orchestra status JOB --cluster FILE / orchestra stop JOB --cluster FILE
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from orchestration.spec import SpecError

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"


def _abs_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path.cwd() / uri[len('sqlite:///'):]).resolve()}"
    return uri


def cmd_run(args: argparse.Namespace) -> int:
    from orchestration.runner import run

    out = run(args.spec, overrides=args.set, address=args.address, dry_run=args.dry_run, num_cpus=args.num_cpus,
              launch_name=args.launch_name)
    if isinstance(out, str):
        print(out)
        return 0
    print(out.summary())
    return 130 if out.interrupted else (1 if out.num_errors else 0)


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestration.runner import resume

    out = resume(args.name, storage=args.storage, address=args.address, num_cpus=args.num_cpus)
    print(out.summary())
    return 130 if out.interrupted else (1 if out.num_errors else 0)


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestration.runner import dry_run_text
    from orchestration.spec import load_spec

    spec = load_spec(args.spec, args.set)
    print(f"{args.spec}: OK")
    print(dry_run_text(spec))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from orchestration.tracking import list_runs_table

    print(list_runs_table(_abs_uri(args.uri), args.experiment))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    uri = _abs_uri(args.uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port),
           "--backend-store-uri", uri]
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd)


def cmd_sync(args: argparse.Namespace) -> int:
    from orchestration.tracking import sync_spool

    n = sync_spool(args.path, _abs_uri(args.uri))
    print(f"sent {n} metric points")
    return 0


def cmd_validate_cluster(args: argparse.Namespace) -> int:
    from orchestration.cluster import validate_cluster

    cfg = validate_cluster(args.file)
    types = ", ".join(sorted(cfg.get("available_node_types", {})))
    print(f"{args.file}: OK (cluster {cfg.get('cluster_name')!r}; node types: {types})")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from orchestration.launch import launch

    res = launch(args.spec, args.cluster, args.set, detach=args.detach, dashboard_address=args.dashboard_address,
                 storage=args.storage, project_dir=args.project_dir, start=not args.no_start)
    return 0 if res.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from orchestration.launch import job_status

    info = job_status(args.job, args.cluster, args.dashboard_address)
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from orchestration.launch import stop_job

    print(f"{args.job}: {stop_job(args.job, args.cluster, args.dashboard_address)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestration import report as rep

    uri = _abs_uri(args.uri)
    data = rep.load_experiment(uri, args.name, launch=args.launch)
    metric = args.metric or data.metric or "env/episode_return_mean"
    if args.parquet:
        for p in rep.write_parquet(data, args.parquet):
            print(f"wrote {p}")
    if args.html:
        out = args.out or str(Path("reports") / args.name)
        index = rep.write_report(uri, args.name, out, metric=metric, launch=args.launch)
        print(f"wrote {index} (also attached to the launch's MLflow run under report/)")
    else:
        print(rep.summary_table(rep.aggregate_final(data, metric), metric))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from orchestration.evaluate import evaluate_checkpoint

    try:
        res = evaluate_checkpoint(args.checkpoint, env=args.env, episodes=args.episodes, seed=args.seed,
                                  video=args.video, out_dir=args.out, log=not args.no_log, module_id=args.module)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, (r, n) in enumerate(zip(res.returns, res.lengths)):
        print(f"episode {i}: return {r:.6g} ({n} steps)")
    m = res.metrics()
    print(f"{res.env}: mean return {m['eval/checkpoint/episode_return_mean']:.6g} "
          f"± {m['eval/checkpoint/episode_return_std']:.3g} over {len(res.returns)} deterministic episodes")
    if res.video:
        print(f"video: {res.video}")
    for msg in res.messages:
        print(msg)
    if res.run_id:
        print(f"logged under eval/checkpoint/ to MLflow run {res.run_id} ({res.tracking_uri})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestra", description="Run RL and meta-learning experiments from YAML specs.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a spec")
    r.add_argument("spec")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (YAML value)")
    r.add_argument("--dry-run", action="store_true", help="print the trials, resources and stop rule; run nothing")
    r.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto) instead of a local one")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    r.add_argument("--launch-name", default=None, help="launch name (default: <spec name>-<timestamp>)")
    r.set_defaults(fn=cmd_run)

    rs = sub.add_parser("resume", help="continue an interrupted launch")
    rs.add_argument("name", help="launch name (spec name: its newest launch)")
    rs.add_argument("--storage", default="runs")
    rs.add_argument("--address", default=None)
    rs.add_argument("--num-cpus", type=int, default=None)
    rs.set_defaults(fn=cmd_resume)

    v = sub.add_parser("validate", help="check a spec without running it")
    v.add_argument("spec")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=cmd_validate)

    ls = sub.add_parser("ls", help="list experiments, runs, status and best metric")
    ls.add_argument("experiment", nargs="?", default=None)
    ls.add_argument("--uri", default=DEFAULT_URI)
    ls.set_defaults(fn=cmd_ls)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--uri", default=DEFAULT_URI)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(fn=cmd_ui)

    sy = sub.add_parser("sync", help="upload spooled metric batches to MLflow")
    sy.add_argument("path", help="launch or trial folder holding mlflow_spool.jsonl files")
    sy.add_argument("--uri", default=DEFAULT_URI)
    sy.set_defaults(fn=cmd_sync)
    rp = sub.add_parser("report", help="aggregate seeds, plot, write an HTML report (or print a summary table)")
    rp.add_argument("name", help="MLflow experiment (the spec's name)")
    rp.add_argument("--uri", default=DEFAULT_URI)
    rp.add_argument("--metric", default=None, help="default: the spec's metric")
    rp.add_argument("--launch", default=None, help="only this launch")
    rp.add_argument("--html", action="store_true", help="write plots and index.html")
    rp.add_argument("--out", default=None, help="report folder (default reports/NAME)")
    rp.add_argument("--parquet", default=None, metavar="DIR", help="export runs and histories as Parquet")
    rp.set_defaults(fn=cmd_report)

    ev = sub.add_parser("eval", help="run deterministic episodes of a checkpoint; log them to the trial's MLflow run")
    ev.add_argument("checkpoint", help="Tune trial checkpoint or RLlib checkpoint folder")
    ev.add_argument("--env", default=None, help="gymnasium id (default: the checkpoint's env)")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--seed", type=int, default=0, help="episode k resets with seed + k")
    ev.add_argument("--video", action="store_true", help="record the first episode as a GIF (eval/ artifact)")
    ev.add_argument("--out", default=None, help="video folder (default CHECKPOINT/eval)")
    ev.add_argument("--module", default=None, help="module id (default: default_policy or the only one)")
    ev.add_argument("--no-log", action="store_true", help="print only; do not log to MLflow")
    ev.set_defaults(fn=cmd_eval)

    vc = sub.add_parser("validate-cluster", help="check a `ray up` cluster config (Ray's validator + ours)")
    vc.add_argument("file")
    vc.set_defaults(fn=cmd_validate_cluster)

    la = sub.add_parser("launch", help="run a spec as a Ray Job on a `ray up` cluster (starts it if needed)")
    la.add_argument("spec")
    la.add_argument("--cluster", required=True, help="the `ray up` config (cluster.yaml, cluster-local.yaml)")
    la.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    la.add_argument("--detach", action="store_true", help="submit and return; follow with `orchestra status`")
    la.add_argument("--storage", default=None, help="Tune storage (s3://...) instead of the cluster's")
    la.add_argument("--dashboard-address", default=None,
                    help="the head's dashboard (default: SSH-forwarded with `ray dashboard`)")
    la.add_argument("--project-dir", default=None, help="folder shipped as the job's working_dir (default: .)")
    la.add_argument("--no-start", action="store_true", help="do not run `ray up` when the cluster is down")
    la.set_defaults(fn=cmd_launch)
    for cmd, fn, text in (("status", cmd_status, "status of a launched job"), ("stop", cmd_stop, "stop a launched job")):
        sp = sub.add_parser(cmd, help=text)
        sp.add_argument("job", help="job id (the launch name printed by `orchestra launch`)")
        sp.add_argument("--cluster", required=True)
        sp.add_argument("--dashboard-address", default=None)
        sp.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    from orchestration.env import set_local_ray_env

    args = build_parser().parse_args(argv)
    if getattr(args, "address", None):  # joining a cluster: Ray's multi-node mode, not loopback-only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    set_local_ray_env()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return int(args.fn(args) or 0)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # cluster commands: `ray up` failed, dashboard unreachable, ...
        if args.command not in ("launch", "status", "stop"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: resume with `orchestra resume <launch>`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
