"""`orchestra` command line: a thin layer over orchestration's Python API.

    orchestra run SPEC [--set key=value ...] [--dry-run] [--address ADDR]
    orchestra resume NAME              continue an interrupted launch (launch name or spec name)
    orchestra validate SPEC [--set ...] check a spec without running it (names resolve)
    orchestra validate --settings NAME  list an algorithm's (or task's) settings: type, default, allowed, doc
    orchestra ls [EXPERIMENT]          experiments and runs with status and best metric
    orchestra ui [EXPERIMENT] [--port N]   MLflow UI on 127.0.0.1; prints the experiment's runs page
    orchestra ui [EXPERIMENT] --cluster FILE [--port N] [--dashboard-port N]   the head's MLflow UI and Ray
                                       dashboard here, over SSH (closed with orchestra ui)
    orchestra server [--root DIR] [--host H] [--port N] [--admin-password-file F]   shared MLflow server, auth on
    orchestra sync PATH                upload metric batches spooled while MLflow was unreachable
    orchestra report NAME [--html] [--parquet DIR]   seed aggregates, plots, HTML report
    orchestra eval CHECKPOINT [--env NAME] [--episodes K] [--video]   deterministic episodes, logged to MLflow
    orchestra validate-cluster FILE    check a `ray up` config (Ray's validator + our security rules)
    orchestra launch SPEC --cluster FILE [--set ...] [--detach]   run a spec as a Ray Job on a cluster
    orchestra launch SPEC --slurm [--nodes N] [--gpus-per-node G] [--cpus-per-node C] [--partition P]
                     [--time T] [--sbatch OPTION ...] [--dry-run] [--new]   a Slurm job running Ray and the spec
    orchestra status JOB --cluster FILE / orchestra stop JOB --cluster FILE   (--slurm: a Slurm job)
    orchestra --version

Errors in what the user asked for (a missing file, an unknown experiment or launch, a bad option value,
an unusable --uri) print one line ``error: ...`` on stderr and exit 2. ``--uri`` defaults to
``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlruns/mlflow.db``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from orchestration.spec import UserError

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
URI_ENV = "MLFLOW_TRACKING_URI"
URI_HELP = f"MLflow tracking URI (default: ${URI_ENV} if set, else {DEFAULT_URI})"
# Store URI schemes MLflow's tracking store registry accepts (no scheme: a local folder).
URI_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
URI_ALLOWED = ("sqlite:///PATH, file:///PATH or a folder, http(s)://HOST:PORT of an MLflow server, "
               "postgresql://, mysql://, mssql://, databricks")
STORE_COMMANDS = ("ls", "ui", "sync", "report", "eval")


def _abs_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(Path.cwd() / uri[len('sqlite:///'):]).resolve()}"
    return uri


def _uri_arg(args: argparse.Namespace) -> tuple[str, str]:
    """(URI as given, where it came from): --uri, else $MLFLOW_TRACKING_URI, else the default."""
    if getattr(args, "uri", None):
        return args.uri, "--uri"
    if os.environ.get(URI_ENV):
        return os.environ[URI_ENV], f"${URI_ENV}"
    return DEFAULT_URI, "--uri (default)"


def store_uri(args: argparse.Namespace, *, must_exist: bool = True, local_only: bool = False) -> str:
    """The command's MLflow store URI, absolute, checked before MLflow sees it (UserError otherwise):
    a known scheme; a SQLite file or store folder that exists (``must_exist``, else its folder);
    a tracking server that accepts connections."""
    raw, source = _uri_arg(args)
    where = f"{source} {raw!r}"
    scheme = raw.split("://", 1)[0].split("+", 1)[0].lower() if "://" in raw else (
        "file" if raw.startswith("file:") else "")
    if scheme and scheme not in URI_SCHEMES:
        raise UserError(f"{where}: unsupported URI scheme {scheme!r}; allowed: {URI_ALLOWED}")
    if local_only and scheme in ("http", "https", "databricks"):
        raise UserError(f"{where}: `orchestra ui` serves a local store (sqlite:///PATH, a folder or a database "
                        f"URI); a tracking server serves its own UI: open {raw} in a browser")
    uri = _abs_uri(raw)
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            f = Path(path)
            if must_exist and not f.is_file():
                raise UserError(f"{where}: no MLflow store at {f} (file not found); `orchestra run` creates it, "
                                f"or point --uri / ${URI_ENV} at an existing store")
            if not f.parent.is_dir():
                raise UserError(f"{where}: folder {f.parent} does not exist")
    elif scheme in ("", "file"):
        folder = Path(raw[len("file://"):] if raw.startswith("file://") else raw[len("file:"):] if scheme else raw)
        if must_exist and not folder.is_dir():
            raise UserError(f"{where}: no MLflow store folder {folder}; allowed: {URI_ALLOWED}")
    elif scheme in ("http", "https"):
        _check_server(raw, where)
    return uri


def _check_server(url: str, where: str) -> None:
    """Reachable, and the credentials MLflow's client will send are accepted (orchestration.tracking.access)."""
    from orchestration.tracking.access import check_tracking_server

    check_tracking_server(url, where)


def _one_line(text: object) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _error(message: object) -> None:
    text = _one_line(message)
    print(text if text.startswith("error:") else f"error: {text}", file=sys.stderr)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orchestra-rl")
    except PackageNotFoundError:
        return "unknown (orchestra-rl is not installed)"


def cmd_run(args: argparse.Namespace) -> int:
    from orchestration.runner import run

    out = run(args.spec, overrides=args.set, address=args.address, dry_run=args.dry_run, num_cpus=args.num_cpus,
              launch_name=args.launch_name, verbose=args.verbose)
    if isinstance(out, str):
        print(out)
        return 0
    print(out.summary())
    return 130 if out.interrupted else (1 if out.num_errors else 0)


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestration.runner import resume

    out = resume(args.name, storage=args.storage, address=args.address, num_cpus=args.num_cpus, verbose=args.verbose)
    print(out.summary())
    return 130 if out.interrupted else (1 if out.num_errors else 0)


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestration.runner import dry_run_text
    from orchestration.spec import load_spec, settings_listing

    if args.settings is not None:
        if args.spec is not None:
            raise UserError("orchestra validate: give a SPEC or --settings NAME, not both")
        print("\n".join(settings_listing(args.settings)))
        return 0
    if args.spec is None:
        raise UserError("orchestra validate: needs a SPEC file, or --settings NAME (e.g. --settings WPO)")
    spec = load_spec(args.spec, args.set)
    print(f"{args.spec}: OK")
    print(dry_run_text(spec))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from orchestration.runs_table import list_runs_table

    print(list_runs_table(store_uri(args), args.experiment))
    return 0


def _free_local_port(port: int, option: str) -> None:
    if not 0 < port < 65536:
        raise UserError(f"{option} {port}: allowed: 1..65535")
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"{option} {port}: 127.0.0.1:{port} is not free ({e.strerror}); "
                            f"pick another port with {option}") from None


def cmd_ui(args: argparse.Namespace) -> int:
    if args.cluster:  # the head's MLflow server and dashboard over SSH (orchestration.tunnel)
        if args.uri:
            raise UserError("--uri and --cluster: --cluster opens the cluster's own MLflow server "
                            "(metadata.orchestra.tracking_uri); give one of them")
        for value, option in ((args.port, "--port"), (args.dashboard_port, "--dashboard-port")):
            if value is not None:
                _free_local_port(value, option)
        from orchestration.ui import serve_cluster

        return serve_cluster(args.cluster, args.port, args.dashboard_port, args.experiment)
    if args.dashboard_port is not None:
        raise UserError("--dashboard-port: only with --cluster (a local store has no Ray dashboard)")
    uri = store_uri(args, local_only=True)
    port = 5000 if args.port is None else args.port
    _free_local_port(port, "--port")
    from orchestration.ui import serve

    return serve(uri, port, args.experiment)


def cmd_server(args: argparse.Namespace) -> int:
    from orchestration.server import ServerConfig, serve

    return serve(ServerConfig(
        root=Path(args.root), host=args.host, port=args.port, admin_username=args.admin_username,
        admin_password_file=args.admin_password_file, default_permission=args.default_permission,
        allowed_hosts=args.allowed_hosts, cors_allowed_origins=args.cors_allowed_origins, workers=args.workers))


def cmd_sync(args: argparse.Namespace) -> int:
    from orchestration.tracking import SPOOL_NAME, sync_spool

    n = sync_spool(args.path, store_uri(args, must_exist=False))
    if Path(args.path).is_dir() and not any(Path(args.path).rglob(SPOOL_NAME + "*")):
        print(f"nothing to sync: no {SPOOL_NAME} under {args.path}")
    print(f"sent {n} metric points")
    return 0


def cmd_validate_cluster(args: argparse.Namespace) -> int:
    from orchestration.cluster import validate_cluster

    cfg = validate_cluster(args.file)
    types = ", ".join(sorted(cfg.get("available_node_types", {})))
    print(f"{args.file}: OK (cluster {cfg.get('cluster_name')!r}; node types: {types})")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    if args.slurm:
        ray_jobs_only = [o for o, v in (("--detach", args.detach), ("--storage", args.storage),
                                        ("--dashboard-address", args.dashboard_address),
                                        ("--project-dir", args.project_dir), ("--no-start", args.no_start)) if v]
        if ray_jobs_only:  # a Slurm job always returns at once and keeps its launch in tracking.storage
            raise UserError(f"{ray_jobs_only[0]}: only with --cluster (with --slurm the job runs detached, "
                            "from this folder, with Tune storage tracking.storage: --set tracking.storage=DIR)")
        from orchestration.slurm import SlurmOptions, launch_slurm

        opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                            partition=args.partition, time=args.time, sbatch_lines=args.sbatch, setup=args.setup)
        launch_slurm(args.spec, args.set, opts, dry_run=args.dry_run, new=args.new)
        return 0
    slurm_only = [o for o, v in (("--dry-run", args.dry_run), ("--new", args.new)) if v]
    if slurm_only:
        raise UserError(f"{slurm_only[0]}: only with --slurm")
    from orchestration.launch import launch

    res = launch(args.spec, args.cluster, args.set, detach=args.detach, dashboard_address=args.dashboard_address,
                 storage=args.storage, project_dir=args.project_dir, start=not args.no_start)
    return 0 if res.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    if args.slurm:
        from orchestration.slurm import job_state

        info = job_state(args.job)
    else:
        from orchestration.launch import job_status

        info = job_status(args.job, args.cluster, args.dashboard_address)
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    if args.slurm:
        from orchestration.slurm import stop_job as stop_slurm_job

        print(f"{args.job}: {stop_slurm_job(args.job)}")
        return 0
    from orchestration.launch import stop_job

    print(f"{args.job}: {stop_job(args.job, args.cluster, args.dashboard_address)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestration import report as rep

    uri = store_uri(args)
    data = rep.load_experiment(uri, args.name, launch=args.launch)
    metric = args.metric or data.metric or "env/episode_return_mean"
    rep.require_metric(data, metric)
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

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {args.checkpoint}: {'not a folder' if ckpt.exists() else 'no such folder'} "
                        "(a Tune trial checkpoint, e.g. runs/<launch>/<trial>/checkpoint_000003, or an RLlib "
                        "checkpoint folder)")
    if args.episodes < 1:
        raise UserError(f"--episodes {args.episodes}: allowed: 1 or more")
    if args.env:
        from orchestration.spec import SpecError, check_env

        try:
            check_env(args.env, None)
        except SpecError as e:
            raise UserError(f"--env {args.env!r}: {e.message}; allowed: {e.allowed}") from None
    try:
        res = evaluate_checkpoint(args.checkpoint, env=args.env, episodes=args.episodes, seed=args.seed,
                                  video=args.video, out_dir=args.out, log=not args.no_log, module_id=args.module)
    except (ValueError, FileNotFoundError, KeyError) as e:  # no module, unknown --module, no env id
        if not isinstance(e, UserError):
            e = UserError(e.args[0] if e.args else type(e).__name__)
        raise e from None
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


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line ``error: ...`` (exit 2); subcommand parsers inherit it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {_one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="orchestra", description="Run RL and meta-learning experiments from YAML specs.")
    p.add_argument("--version", action="version", version=f"orchestra {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a spec")
    r.add_argument("spec")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key (YAML value)")
    r.add_argument("--dry-run", action="store_true", help="print the trials, resources and stop rule; run nothing")
    r.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto) instead of a local one")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    r.add_argument("--launch-name", default=None, help="launch name (default: <spec name>-<timestamp>)")
    r.add_argument("--verbose", action="store_true",
                   help="also print Ray's, RLlib's and the trials' log lines (default: in the launch's log files)")
    r.set_defaults(fn=cmd_run)

    rs = sub.add_parser("resume", help="continue an interrupted launch")
    rs.add_argument("name", help="launch name (spec name: its newest launch)")
    rs.add_argument("--storage", default="runs")
    rs.add_argument("--address", default=None)
    rs.add_argument("--num-cpus", type=int, default=None)
    rs.add_argument("--verbose", action="store_true", help="also print Ray's, RLlib's and the trials' log lines")
    rs.set_defaults(fn=cmd_resume)

    v = sub.add_parser("validate", help="check a spec without running it, or list an algorithm's settings")
    v.add_argument("spec", nargs="?", default=None)
    v.add_argument("--settings", default=None, metavar="NAME",
                   help="list NAME's settings (WPO, EVE, a task): name, type, default, allowed values, doc")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=cmd_validate)

    ls = sub.add_parser("ls", help="list experiments, runs, status and best metric")
    ls.add_argument("experiment", nargs="?", default=None)
    ls.add_argument("--uri", default=None, help=URI_HELP)
    ls.set_defaults(fn=cmd_ls)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1; print the experiment's runs page",
                        description="Serve the MLflow UI on 127.0.0.1 and print the URL of the runs table of "
                                    "EXPERIMENT (default: the experiment of the most recent run). SIGTERM or "
                                    "Ctrl-C stops the server with it. With --cluster FILE: forward the `ray up` "
                                    "cluster's MLflow server and Ray dashboard from its head over SSH instead, "
                                    "and close the tunnel on SIGTERM or Ctrl-C.")
    ui.add_argument("experiment", nargs="?", default=None, help="experiment to open (default: the most recent)")
    ui.add_argument("--uri", default=None, help=URI_HELP)
    ui.add_argument("--port", type=int, default=None,
                    help="local port of the MLflow UI (default: 5000; with --cluster a free port)")
    ui.add_argument("--cluster", default=None, metavar="FILE",
                    help="a `ray up` config: forward its head's MLflow server and Ray dashboard here over SSH")
    ui.add_argument("--dashboard-port", type=int, default=None,
                    help="with --cluster: local port of the Ray dashboard (default: a free port)")
    ui.set_defaults(fn=cmd_ui)

    sv = sub.add_parser("server", help="start a shared MLflow tracking server with authentication (basic-auth)",
                        description="Run MLflow's tracking server with its basic-auth app: users and "
                                    "per-experiment permissions, artifacts proxied through the server, "
                                    "127.0.0.1 unless --host. See docs/clusters.md.")
    sv.add_argument("--root", default="mlflow-server", help="folder of the run store, user store and artifacts")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=5000)
    sv.add_argument("--admin-username", default="admin")
    sv.add_argument("--admin-password-file", default=None,
                    help="file holding the admin's password (else $MLFLOW_AUTH_ADMIN_PASSWORD); "
                         "needed on the first start, when the admin is created")
    sv.add_argument("--default-permission", default="NO_PERMISSIONS",
                    help="permission of users on experiments they did not create (default: NO_PERMISSIONS)")
    sv.add_argument("--allowed-hosts", default=None, help="Host headers to accept (default: the server's address)")
    sv.add_argument("--cors-allowed-origins", default=None,
                    help="browser origins allowed to call the API (default: the server's own UI)")
    sv.add_argument("--workers", type=int, default=1)
    sv.set_defaults(fn=cmd_server)

    sy = sub.add_parser("sync", help="upload spooled metric batches to MLflow")
    sy.add_argument("path", help="launch or trial folder holding mlflow_spool.jsonl files")
    sy.add_argument("--uri", default=None, help=URI_HELP)
    sy.set_defaults(fn=cmd_sync)

    rp = sub.add_parser("report", help="aggregate seeds, plot, write an HTML report (or print a summary table)")
    rp.add_argument("name", help="MLflow experiment (the spec's name)")
    rp.add_argument("--uri", default=None, help=URI_HELP)
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

    la = sub.add_parser("launch", help="run a spec as a Ray Job on a `ray up` cluster (starts it if needed), "
                                       "or as a Slurm batch job (--slurm)")
    la.add_argument("spec")
    where = la.add_mutually_exclusive_group(required=True)
    where.add_argument("--cluster", help="the `ray up` config (cluster.yaml, cluster-local.yaml)")
    where.add_argument("--slurm", action="store_true",
                       help="submit an sbatch job that starts Ray on its nodes and runs the spec (docs/clusters.md)")
    sl = la.add_argument_group("--slurm options")
    sl.add_argument("--nodes", type=int, default=1, help="nodes: the first runs the Ray head and the driver")
    sl.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (Ray's --num-gpus)")
    sl.add_argument("--cpus-per-node", type=int, default=None,
                    help="CPUs per node (Ray's --num-cpus; default: what Slurm allocates)")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--time", default=None, help="time limit (Slurm format, e.g. 1-00:00:00)")
    sl.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                    help="another #SBATCH option, e.g. --sbatch=--mem=64G (repeatable)")
    sl.add_argument("--setup", action="append", default=[], metavar="LINE",
                    help="shell line run on the nodes before Ray starts, e.g. 'module load cuda' (repeatable)")
    sl.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    sl.add_argument("--new", action="store_true", help="a new launch even if the spec's last one was interrupted")
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
        sp.add_argument("job", help="job id (the launch name printed by `orchestra launch`; with --slurm the "
                                    "Slurm job id)")
        kind = sp.add_mutually_exclusive_group(required=True)
        kind.add_argument("--cluster")
        kind.add_argument("--slurm", action="store_true", help="a Slurm job (squeue/scontrol/sacct; scancel)")
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
    except UserError as e:  # SpecError included: what the user asked for is wrong, not the code
        _error(e)
        return 2
    except RuntimeError as e:  # cluster commands: `ray up` failed, dashboard unreachable, ...
        if args.command not in ("launch", "status", "stop"):
            raise
        _error(e)
        return 1
    except KeyboardInterrupt:
        if args.command in ("run", "resume"):
            print("interrupted: resume with `orchestra resume <launch>`", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.command not in STORE_COMMANDS or not _is_store_error(e):
            raise
        uri = _abs_uri(_uri_arg(args)[0]) if hasattr(args, "uri") else "the MLflow store"
        _error(f"MLflow store {uri}: {type(e).__name__}: {_one_line(e)[:600]}")
        return 2


def _is_store_error(e: BaseException) -> bool:
    """An error of the MLflow store (unreachable server, not a database, schema MLflow refuses)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # MLflow's SQL stores

    return isinstance(e, MlflowException | SQLAlchemyError)


if __name__ == "__main__":
    sys.exit(main())
