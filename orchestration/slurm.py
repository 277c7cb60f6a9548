"""`orchestra launch SPEC --slurm`: run a spec on a Slurm allocation as a Ray cluster of its own.

The batch script follows Ray's documented Slurm pattern ("Deploying on Slurm",
https://docs.ray.io/en/latest/cluster/vms/user-guides/community/slurm.html): one task per node, the
Ray head started with ``srun`` on the allocation's first node (``ray start --head --block``), a Ray
worker started with ``srun`` on each other node (``ray start --address HEAD --block``), and the
driver, here ``orchestra run SPEC --address HEAD`` (as ``python -m orchestration.cli``), in the batch script itself, which Slurm runs on
the first node. Differences from the documented script, each for a reason:

- node addresses come from Slurm's own node table (``scontrol show node``: ``NodeAddr``) instead of
  ``srun hostname --ip-address``, which needs a job step on the head before Ray can take its CPUs;
- the script polls until every node has joined (``python -m orchestration.slurm wait-nodes``) instead
  of sleeping a fixed time, so trials are spread over the whole allocation from the start, and each
  node's ``ray start`` is tried up to five times: Ray gives a new raylet fixed deadlines (30 s to
  register with the GCS, and one for the node's agents to report their ports), which a busy node misses;
- Ray token authentication is on (``RAY_AUTH_MODE=token``): the Ray ports of the allocation's nodes
  are reachable by every user of the cluster's network, so a per-launch token (a 0600 file in the
  launch folder) is required to join the cluster or submit work to it;
- the dashboard is off (the driver needs only the GCS; no HTTP port on shared nodes).

Files of a launch, under its Tune folder ``<tracking.storage>/<launch>/slurm/``: ``launch.sbatch``
(the script of the latest submission), ``jobs.jsonl`` (one line per submitted job), ``ray_token``,
``slurm-<jobid>.out`` (the job's output) and ``driver-<jobid>.exit`` (the driver's exit status). Storage
must be a folder every node mounts at the same path (the usual shared home or scratch filesystem),
as must the project and its virtual environment: the nodes run the submitting interpreter.

Relaunching resumes: ``orchestra launch --slurm`` with the same spec finds the spec's newest launch
under its storage; when its last job ended without a driver exit status of 0 (cancelled, timed out,
preempted, a node failed), the new job continues it, because the script runs ``orchestra resume``
whenever the launch folder already holds ``orchestra_launch.json`` (Tune restore: unfinished trials
from their last checkpoint, the same MLflow runs, no step logged twice). The same holds for a job
Slurm requeues by itself. ``--new`` starts a new launch instead.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.spec import UserError

RAY_PORT = 6379
SLURM_DIR = "slurm"
SCRIPT_NAME = "launch.sbatch"
JOBS_FILE = "jobs.jsonl"
TOKEN_NAME = "ray_token"
# Job states after which nothing of the job runs any more (squeue/scontrol/sacct spellings).
TERMINAL_STATES = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED")
TIME_RE = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$|^\d+-\d+$|^(UNLIMITED|INFINITE)$")


@dataclass
class SlurmOptions:
    """What `orchestra launch --slurm` asks Slurm for."""

    nodes: int = 1
    """Nodes of the allocation: the first runs the Ray head and the driver, each other a Ray worker."""
    gpus_per_node: int = 0
    """GPUs per node (``#SBATCH --gpus-per-node``); Ray gets them as ``ray start --num-gpus``."""
    cpus_per_node: int | None = None
    """CPUs of the one task per node (``--cpus-per-task``), Ray's ``--num-cpus``; None: what Slurm
    allocates on the node (``$SLURM_CPUS_ON_NODE``)."""
    partition: str | None = None
    time: str | None = None
    """Time limit in Slurm's format (``MM``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM:SS``)."""
    sbatch_lines: list[str] = field(default_factory=list)
    """Further ``#SBATCH`` options (``--mem=64G``, ``--account=lab``, ``--requeue``)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before Ray starts (``module load cuda``)."""

    def check(self) -> None:
        """One UserError per bad value, naming the option and what is allowed."""
        if self.nodes < 1:
            raise UserError(f"--nodes {self.nodes}: allowed: 1 or more")
        if self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node {self.gpus_per_node}: allowed: 0 or more")
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            raise UserError(f"--cpus-per-node {self.cpus_per_node}: allowed: 1 or more")
        if self.time is not None and not TIME_RE.match(self.time):
            raise UserError(f"--time {self.time!r}: not a Slurm time limit; allowed: MM, MM:SS, HH:MM:SS, D-HH, "
                            "D-HH:MM or D-HH:MM:SS")
        for line in self.sbatch_lines:
            if "\n" in line or not _sbatch_option(line).startswith("-"):
                raise UserError(f"--sbatch {line!r}: allowed: one sbatch option such as --mem=64G "
                                "(with or without a leading #SBATCH)")


def _sbatch_option(line: str) -> str:
    line = line.strip()
    return line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line


def slurm_dir(launch_dir: Path) -> Path:
    return Path(launch_dir) / SLURM_DIR


def sbatch_script(
    *,
    launch_name: str,
    launch_dir: Path,
    spec_file: Path,
    overrides: list[str],
    options: SlurmOptions,
    workdir: Path,
    python: str = sys.executable,
    git_commit: str = "unknown",
    command: str = "orchestra launch --slurm",
) -> str:
    """The batch script of one submission (see the module docstring for its parts)."""
    sd = slurm_dir(launch_dir)
    q = shlex.quote
    venv_bin = str(Path(python).parent)
    sets = " ".join(f"--set {q(o)}" for o in overrides)
    head = ["#!/bin/bash",
            f"#SBATCH --job-name={launch_name}",
            f"#SBATCH --nodes={options.nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --output={sd}/slurm-%j.out",
            f"#SBATCH --chdir={workdir}"]
    if options.cpus_per_node is not None:
        head.append(f"#SBATCH --cpus-per-task={options.cpus_per_node}")
    if options.gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={options.gpus_per_node}")
    if options.partition:
        head.append(f"#SBATCH --partition={options.partition}")
    if options.time:
        head.append(f"#SBATCH --time={options.time}")
    head += [f"#SBATCH {_sbatch_option(line)}" for line in options.sbatch_lines]
    cpus = str(options.cpus_per_node) if options.cpus_per_node is not None else "${SLURM_CPUS_ON_NODE}"
    body = f"""
# Written by `orchestra launch --slurm` (orchestration/slurm.py): Ray's Slurm pattern, one task per node.
set -uo pipefail
{chr(10).join(options.setup)}
export PATH={q(venv_bin)}:"$PATH"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH={q(str(sd / TOKEN_NAME))}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1  # Ray's multi-node mode (the Linux default)
export RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1
export ORCHESTRA_GIT_COMMIT={q(git_commit)}
export ORCHESTRA_COMMAND={q(command[:4000])}

node_addr() {{  # a node's address from Slurm's node table (NodeAddr), as an IPv4 address
    local addr
    addr=$(scontrol show node -o "$1" | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
    getent ahostsv4 "${{addr:-$1}}" | awk 'NR == 1 {{print $1}}'
}}

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${{nodes[0]}}
head_ip=$(node_addr "$head_node")
port={RAY_PORT}
ray_address=$head_ip:$port
cpus={cpus}
gpus={options.gpus_per_node}
echo "orchestra: Slurm job $SLURM_JOB_ID, nodes ${{nodes[*]}}, Ray head $ray_address"

ray_node() {{  # NODE IP ARGS...: one srun task running `ray start --block` on NODE, tried up to 5 times
    local node=$1 ip=$2 attempt
    shift 2
    for attempt in 1 2 3 4 5; do  # `ray start` gives its raylet a fixed 30 s to register (a busy node misses it)
        srun --nodes=1 --ntasks=1 -w "$node" ray start --node-ip-address="$ip" --num-cpus="$cpus" \\
            --num-gpus="$gpus" --disable-usage-stats --block "$@" && return 0
        echo "orchestra: ray start on $node ended (attempt $attempt of 5)" >&2
    done
    return 1
}}

ray_node "$head_node" "$head_ip" --head --port=$port --include-dashboard=false &
python -m orchestration.slurm wait-nodes --address "$ray_address" --nodes 1 || exit 1
for ((i = 1; i < ${{#nodes[@]}}; i++)); do
    ray_node "${{nodes[$i]}}" "$(node_addr "${{nodes[$i]}}")" --address="$ray_address" &
done
python -m orchestration.slurm wait-nodes --address "$ray_address" --nodes ${{#nodes[@]}} || exit 1

# A launch folder that already records a launch (an earlier, interrupted job; a requeue) resumes it.
# `python -m orchestration.cli` is `orchestra` with the submit folder on sys.path, as for the local check
# of the spec (modules named in its `imports` next to it).
if [ -f {q(str(Path(launch_dir) / "orchestra_launch.json"))} ]; then
    python -m orchestration.cli resume {q(launch_name)} --storage {q(str(Path(launch_dir).parent))} --address "$ray_address"
else
    python -m orchestration.cli run {q(str(spec_file))} --address "$ray_address" --launch-name {q(launch_name)} {sets}
fi
rc=$?
echo "$rc" > {q(str(sd))}/driver-"$SLURM_JOB_ID".exit
kill $(jobs -p) 2>/dev/null  # the nodes' retry loops: the job ends with its driver, Slurm stops the steps
exit $rc
"""
    return "\n".join(head) + "\n" + body


# ----------------------------------------------------------------------------------------------
# Slurm commands
# ----------------------------------------------------------------------------------------------
def _require(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise UserError(f"{what}: {tool} not found on PATH; run it where Slurm's commands are installed "
                        "(a login node, or after `module load slurm`)")
    return path


def _slurm(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line(text: str) -> str:
    return "; ".join(s.strip() for s in text.splitlines() if s.strip())


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; the job id (a rejected job: UserError with sbatch's message)."""
    sbatch = _require("sbatch", "orchestra launch --slurm")
    res = _slurm([sbatch, "--parsable", str(script)])
    if res.returncode != 0:
        raise UserError(f"{script}: sbatch rejected the job: {_one_line(res.stderr or res.stdout)[:500]}")
    return res.stdout.strip().split(";")[0]


def _fields(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output (``Key=Value`` separated by spaces) as a dict."""
    out = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out.setdefault(k, v)
    return out


def resolve_job(job: str) -> str:
    """A Slurm job id, or the job id of a queued or running job named ``job`` (the launch name)."""
    if job.isdigit():
        return job
    squeue = _require("squeue", "orchestra status/stop --slurm")
    res = _slurm([squeue, "-h", "--name", job, "-o", "%i"])
    ids = res.stdout.split()
    if res.returncode != 0 or not ids:
        raise UserError(f"{job!r}: no queued or running Slurm job with that name; allowed: a Slurm job id "
                        "(printed by `orchestra launch --slurm`) or the launch name of a live job")
    return ids[-1]


def job_state(job: str) -> dict[str, Any]:
    """The job's state from squeue (queued, running), else scontrol (ended within MinJobAge), else sacct
    (accounting). UserError if none of them knows the job."""
    job = resolve_job(job)
    _require("squeue", "orchestra status --slurm")
    res = _slurm(["squeue", "-h", "-j", job, "-o", "%T|%j|%M|%l|%D|%R"])
    if res.returncode == 0 and res.stdout.strip():
        state, name, used, limit, nodes, where = res.stdout.strip().splitlines()[0].split("|", 5)
        return {"job_id": job, "status": state, "name": name, "elapsed": used, "time_limit": limit,
                "nodes": nodes, "nodelist_or_reason": where}
    if shutil.which("scontrol"):
        res = _slurm(["scontrol", "show", "job", "-o", job])
        if res.returncode == 0 and "JobState=" in res.stdout:
            f = _fields(res.stdout)
            return {"job_id": job, "status": f.get("JobState", "?"), "name": f.get("JobName", ""),
                    "elapsed": f.get("RunTime", ""), "time_limit": f.get("TimeLimit", ""),
                    "nodes": f.get("NumNodes", ""), "nodelist_or_reason": f.get("NodeList", ""),
                    "exit_code": f.get("ExitCode", ""), "reason": f.get("Reason", "")}
    if shutil.which("sacct"):
        res = _slurm(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State,JobName,Elapsed,NNodes,NodeList,ExitCode"])
        line = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""
        if line:
            state, name, used, nodes, nodelist, code = (line.split("|") + [""] * 6)[:6]
            return {"job_id": job, "status": state.split()[0], "name": name, "elapsed": used, "nodes": nodes,
                    "nodelist_or_reason": nodelist, "exit_code": code}
    raise UserError(f"Slurm job {job}: unknown to squeue and scontrol (and sacct, where accounting is on); "
                    "allowed: the id printed by `orchestra launch --slurm`")


def is_live(state: str) -> bool:
    return state.split()[0].rstrip("+") not in TERMINAL_STATES


def stop_job(job: str, wait: float = 300) -> str:
    """``scancel JOB``, then the job's state once it ended (or the last seen after ``wait`` s)."""
    job = resolve_job(job)
    scancel = _require("scancel", "orchestra stop --slurm")
    res = _slurm([scancel, job])
    if res.returncode != 0:
        raise UserError(f"Slurm job {job}: scancel failed: {_one_line(res.stderr or res.stdout)[:500]}")
    deadline = time.time() + wait
    state = job_state(job)["status"]
    while is_live(state) and time.time() < deadline:
        time.sleep(1)
        state = job_state(job)["status"]
    return state


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
@dataclass
class SlurmLaunch:
    launch: str
    launch_dir: Path
    job_id: str | None
    script: str
    resumed: bool


def _last_job(sd: Path) -> dict[str, Any] | None:
    f = sd / JOBS_FILE
    if not f.exists():
        return None
    lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return lines[-1] if lines else None


def _finished(sd: Path, job_id: str) -> bool:
    f = sd / f"driver-{job_id}.exit"
    return f.exists() and f.read_text().strip() == "0"


def previous_launch(storage: Path, spec_name: str) -> Path | None:
    """The spec's newest launch under ``storage`` submitted with --slurm (None: none yet)."""
    found = [d for d in storage.glob(f"{spec_name}-*") if (slurm_dir(d) / JOBS_FILE).exists()]
    return max(found, key=lambda d: (slurm_dir(d) / JOBS_FILE).stat().st_mtime) if found else None


def launch_slurm(
    spec_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    options: SlurmOptions | None = None,
    *,
    dry_run: bool = False,
    new: bool = False,
    out: Callable[[str], None] = print,
) -> SlurmLaunch:
    """Submit ``spec_path`` as a Slurm batch job (see the module docstring); resume its interrupted launch."""
    from orchestration.runner import _git_commit, resolve_paths
    from orchestration.spec import SpecError, load_spec

    options = options or SlurmOptions()
    options.check()
    spec_path = Path(spec_path).resolve()
    spec = resolve_paths(load_spec(spec_path, list(overrides)))  # locally: names resolve, errors name the key
    storage = spec.tracking.storage
    if "://" in storage:
        raise SpecError(str(spec_path), "tracking.storage", "`orchestra launch --slurm` keeps the launch on a "
                        "filesystem every node mounts", storage, allowed="a folder on a shared filesystem")
    if not dry_run:
        _require("sbatch", "orchestra launch --slurm")
    storage_dir = Path(storage)
    prev = None if new else previous_launch(storage_dir, spec.name)
    resumed = False
    name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if prev is not None:
        last = _last_job(slurm_dir(prev)) or {}
        job = str(last.get("job_id", ""))
        state = "unknown"
        if job and not dry_run:
            try:
                state = job_state(job)["status"]
            except UserError:
                state = "unknown to Slurm"
        if job and not dry_run and state != "unknown to Slurm" and is_live(state):
            raise UserError(f"launch {prev.name} is already Slurm job {job} ({state}); follow it with "
                            f"`orchestra status {job} --slurm`, stop it with `orchestra stop {job} --slurm`, "
                            "or start another launch with --new")
        if not (job and _finished(slurm_dir(prev), job)):
            name, resumed = prev.name, True
            out(f"resuming launch {name} (its last Slurm job {job or '?'} ended {state} before the sweep "
                "finished); --new starts a new launch")
    launch_dir = storage_dir / name
    sd = slurm_dir(launch_dir)
    cwd = Path.cwd().resolve()
    command = " ".join(shlex.quote(a) for a in ["orchestra", *sys.argv[1:]]) if sys.argv else "orchestra launch"
    script = sbatch_script(launch_name=name, launch_dir=launch_dir, spec_file=spec_path, overrides=list(overrides),
                           options=options, workdir=cwd, git_commit=_git_commit(spec_path.parent),
                           command=command)
    if dry_run:
        out(script)
        return SlurmLaunch(name, launch_dir, None, script, resumed)
    sd.mkdir(parents=True, exist_ok=True)
    token = sd / TOKEN_NAME
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    path = sd / SCRIPT_NAME
    path.write_text(script)
    job_id = submit(path)
    with open(sd / JOBS_FILE, "a") as f:
        f.write(json.dumps({"job_id": job_id, "submitted": time.time(), "resume": resumed}) + "\n")
    out(f"submitted Slurm job {job_id} (launch {name}{', resumed' if resumed else ''}): {path}")
    out(f"log:  {sd / f'slurm-{job_id}.out'}")
    out(f"job:  orchestra status {job_id} --slurm   |   orchestra stop {job_id} --slurm")
    out(f"MLflow: {spec.tracking.uri} (experiment {spec.experiment_name!r}, run {name!r})")
    return SlurmLaunch(name, launch_dir, job_id, script, resumed)


# ----------------------------------------------------------------------------------------------
# Inside the job
# ----------------------------------------------------------------------------------------------
def wait_nodes(address: str, nodes: int, timeout: float) -> int:
    """Poll the Ray cluster at ``address`` until ``nodes`` nodes are alive; 0, or 1 after ``timeout`` s."""
    import ray

    from orchestration.env import set_local_ray_env

    set_local_ray_env()
    deadline = time.time() + timeout
    alive, last = 0, ""
    while time.time() < deadline:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            alive = sum(bool(n["Alive"]) for n in ray.nodes())
        except Exception as e:  # noqa: BLE001 - the GCS is not up yet
            last = f"{type(e).__name__}: {_one_line(str(e))[:300]}"
        finally:
            ray.shutdown()
        if alive >= nodes:
            print(f"orchestra: {alive} Ray node(s) alive at {address}", flush=True)
            return 0
        time.sleep(2)
    print(f"orchestra: {alive} of {nodes} Ray nodes alive at {address} after {timeout:.0f}s {last}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m orchestration.slurm")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait-nodes", help="wait until the Ray cluster has N alive nodes")
    w.add_argument("--address", required=True)
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    return wait_nodes(args.address, args.nodes, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
