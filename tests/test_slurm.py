"""`orchestra launch --slurm`: the batch script, the one-line errors, and a real two-node Slurm.

The real cluster (tests/slurm.py) is munged, slurmctld and two slurmd, each slurmd in its own network, PID
and mount namespaces (tests/netns.py), so each Slurm node is a separate "machine" with its own address,
processes and /tmp/ray. A two-trial sweep submitted with `orchestra launch --slurm --nodes 2` starts a Ray
head on the first node and a worker on the second, runs one trial on each, logs to MLflow (SQLite on the
shared filesystem); `orchestra stop --slurm` (scancel) cancels it mid-sweep, and `orchestra launch --slurm`
of the same spec resumes it: each trial's steps in MLflow are 1..N exactly once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestration.slurm import SlurmOptions, sbatch_script

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRA = [sys.executable, "-m", "orchestration.cli"]


def _script(**kw) -> str:
    opts = SlurmOptions(**kw)
    opts.check()
    return sbatch_script(launch_name="study-20260101-000000", launch_dir=Path("/shared/runs/study-20260101-000000"),
                         spec_file=Path("/shared/exp/study.yaml"), overrides=["config.lr=0.1", "name=study"],
                         options=opts, workdir=Path("/shared/exp"), python="/shared/venv/bin/python",
                         git_commit="abc123")


def test_script_follows_rays_slurm_pattern():
    s = _script(nodes=3, gpus_per_node=2, cpus_per_node=8, partition="gpu", time="1-00:00:00",
                sbatch_lines=["--mem=64G", "#SBATCH --account=lab"], setup=["module load cuda/12"])
    lines = s.splitlines()
    assert lines[0] == "#!/bin/bash"
    for opt in ("--job-name=study-20260101-000000", "--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=8",
                "--gpus-per-node=2", "--partition=gpu", "--time=1-00:00:00", "--mem=64G", "--account=lab",
                "--chdir=/shared/exp", "--output=/shared/runs/study-20260101-000000/slurm/slurm-%j.out"):
        assert f"#SBATCH {opt}" in lines, opt
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives == list(range(1, len(directives) + 1)), "sbatch reads #SBATCH lines only before any command"
    # one srun task per node running `ray start --block` (retried): the head on the first node, a worker
    # on each other node
    srun = 'srun --nodes=1 --ntasks=1 -w "$node" ray start --node-ip-address="$ip" --num-cpus="$cpus" \\\n' \
           '            --num-gpus="$gpus" --disable-usage-stats --block "$@" && return 0'
    assert srun in s and s.count("srun --") == 1 and "for attempt in 1 2 3 4 5; do" in s
    head = s.index('ray_node "$head_node" "$head_ip" --head --port=$port --include-dashboard=false &')
    assert 'for ((i = 1; i < ${#nodes[@]}; i++)); do\n    ray_node "${nodes[$i]}" "$(node_addr "${nodes[$i]}")" ' \
           '--address="$ray_address" &' in s
    # GPUs and CPUs per node become Ray resources on every node
    assert "gpus=2" in lines and "cpus=8" in lines
    # token authentication with the launch's own token file; the venv of the submitting interpreter
    assert "export RAY_AUTH_MODE=token" in lines
    assert "export RAY_AUTH_TOKEN_PATH=/shared/runs/study-20260101-000000/slurm/ray_token" in lines
    assert "export PATH=/shared/venv/bin:\"$PATH\"" in lines and "export ORCHESTRA_GIT_COMMIT=abc123" in lines
    assert s.index("module load cuda/12") < head
    # the driver on the head after every node joined: run, or resume when the launch exists
    assert s.index("wait-nodes --address \"$ray_address\" --nodes ${#nodes[@]}") < s.index("orchestration.cli run")
    assert ("python -m orchestration.cli run /shared/exp/study.yaml --address \"$ray_address\" --launch-name study-20260101-000000 "
            "--set config.lr=0.1 --set name=study") in s
    assert "python -m orchestration.cli resume study-20260101-000000 --storage /shared/runs --address \"$ray_address\"" in s
    assert "if [ -f /shared/runs/study-20260101-000000/orchestra_launch.json ]" in s
    assert "--include-dashboard=false" in s
    assert s.index("driver-\"$SLURM_JOB_ID\".exit") < s.index("kill $(jobs -p)") < s.index("exit $rc")


def test_script_defaults_and_bash_syntax(tmp_path):
    s = _script()
    assert "#SBATCH --nodes=1" in s and "--gpus-per-node" not in s and "--cpus-per-task" not in s
    assert "cpus=${SLURM_CPUS_ON_NODE}" in s.splitlines() and "gpus=0" in s.splitlines()
    assert "--partition" not in s and "--time" not in s
    f = tmp_path / "launch.sbatch"
    f.write_text(s)
    res = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def _cli(args: list[str], cwd: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([*ORCHESTRA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _one_line_error(res: subprocess.CompletedProcess, *parts: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for p in parts:
        assert p in lines[0], (p, lines[0])


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slurm_cli")
    (d / "tiny.yaml").write_text(textwrap.dedent(f"""\
        name: tiny
        task: regression_demo
        seeds: [0]
        stop: {{training_iteration: 1}}
        tracking: {{uri: "sqlite:///{d / 'mlflow.db'}", storage: "{d / 'runs'}"}}
    """))
    return d


def test_cli_errors_are_one_line_exit_2(spec_dir, tmp_path):
    empty = tmp_path / "bin"  # a PATH without Slurm's commands
    empty.mkdir()
    _one_line_error(_cli(["launch", "tiny.yaml", "--slurm"], spec_dir, path=str(empty)),
                    "orchestra launch --slurm", "sbatch not found on PATH")
    _one_line_error(_cli(["status", "17", "--slurm"], spec_dir, path=str(empty)), "squeue not found on PATH")
    _one_line_error(_cli(["launch", "tiny.yaml", "--slurm", "--nodes", "0", "--dry-run"], spec_dir),
                    "--nodes 0", "allowed: 1 or more")
    _one_line_error(_cli(["launch", "tiny.yaml", "--slurm", "--time", "soon", "--dry-run"], spec_dir),
                    "--time 'soon'", "HH:MM:SS")
    _one_line_error(_cli(["launch", "tiny.yaml", "--slurm", "--sbatch", "mem=1G", "--dry-run"], spec_dir),
                    "--sbatch 'mem=1G'", "--mem=64G")
    _one_line_error(_cli(["launch", "tiny.yaml", "--slurm", "--cluster", "c.yaml"], spec_dir),
                    "not allowed with argument")
    _one_line_error(_cli(["launch", "tiny.yaml", "--cluster", "c.yaml", "--dry-run"], spec_dir),
                    "--dry-run: only with --slurm")
    _one_line_error(_cli(["launch", "tiny.yaml", "--slurm", "--storage", "s3://b/runs"], spec_dir),
                    "--storage: only with --cluster", "--set tracking.storage=DIR")


def test_dry_run_prints_the_script_and_submits_nothing(spec_dir, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    res = _cli(["launch", "tiny.yaml", "--slurm", "--nodes", "2", "--gpus-per-node", "1", "--dry-run"], spec_dir,
               path=str(empty))  # no sbatch needed to look at the script
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in res.stdout and "gpus=1" in res.stdout
    assert not (spec_dir / "runs").exists()


def test_relaunch_resumes_an_interrupted_launch_and_not_a_finished_one(spec_dir):
    from orchestration.slurm import launch_slurm

    old = spec_dir / "runs" / "tiny-20260101-000000"
    (old / "slurm").mkdir(parents=True)
    (old / "slurm" / "jobs.jsonl").write_text('{"job_id": "41"}\n{"job_id": "42"}\n')
    (old / "slurm" / "driver-41.exit").write_text("0\n")  # an earlier job's status does not count
    printed: list[str] = []
    cwd = os.getcwd()
    os.chdir(spec_dir)
    try:
        res = launch_slurm("tiny.yaml", options=SlurmOptions(nodes=2), dry_run=True, out=printed.append)
        assert res.resumed and res.launch == old.name
        assert printed[0].startswith(f"resuming launch {old.name} (its last Slurm job 42 ended")
        assert f"#SBATCH --job-name={old.name}" in res.script
        fresh = launch_slurm("tiny.yaml", dry_run=True, new=True, out=printed.append)
        assert not fresh.resumed and fresh.launch != old.name
        (old / "slurm" / "driver-42.exit").write_text("0\n")  # the last job's driver finished the sweep
        after = launch_slurm("tiny.yaml", dry_run=True, out=printed.append)
        assert not after.resumed and after.launch != old.name
    finally:
        os.chdir(cwd)
        shutil.rmtree(spec_dir / "runs")


# ----------------------------------------------------------------------------------------------
# A real two-node Slurm
# ----------------------------------------------------------------------------------------------
N_ITER = 5
STEPS = 20  # regression_demo's steps per iteration
RAY_MARKERS = ("raylet", "gcs_server", "ray::", "default_worker", "ray start")


def _mlflow(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100) if exp else []
    parents = [r for r in runs if r.data.tags.get("orchestra.run_type") == "launch"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def _steps(client, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))]


def _first_node_ips(launch_dir: Path) -> list[str]:
    ips = []
    for rj in sorted(launch_dir.glob("*/result.json")):
        rows = [json.loads(line) for line in rj.read_text().splitlines() if line.strip()]
        if rows:
            ips.append(rows[0]["node_ip"])
    return ips


def _checkpoints_named(launch_dir: Path) -> bool:
    """Tune's newest experiment state names a checkpoint of both trials (what a restore starts from)."""
    from algorithms.ray_compat import training_run_metadata

    states = list(launch_dir.glob("experiment_state-*.json"))
    if not states:
        return False
    data = json.loads(max(states, key=lambda f: f.stat().st_mtime).read_text())["trial_data"]
    latest = [training_run_metadata(rt).checkpoint_manager.latest_checkpoint_result for _, rt in data]
    return len(latest) == 2 and all(r is not None for r in latest)


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(2400)
def test_sweep_on_two_slurm_nodes_cancelled_and_resumed(tmp_path):
    import slurm as S
    from netns import Lab, wait_for

    skip = S.have_slurm()
    if skip:
        pytest.skip(skip)
    cluster = S.SlurmCluster(tmp_path / "slurm", Lab(tmp_path / "lab"))
    try:
        cluster.start()
        head, worker = cluster.nodes["nodea"], cluster.nodes["nodeb"]
        shutil.copy(Path(__file__).with_name("gated_task.py"), tmp_path / "gated_task.py")
        gate = tmp_path / "release"
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
        # Each trial waits before iteration 3 until `gate` exists: the cancel comes mid-sweep by construction.
        (tmp_path / "sweep.yaml").write_text(textwrap.dedent(f"""\
            name: slurm_sweep
            task: gated_regression
            imports: [gated_task]
            config: {{lr: 0.05, gate_iteration: 3, gate_file: "{gate}"}}
            seeds: [0, 1]
            stop: {{training_iteration: {N_ITER}}}
            resources: {{cpus: 1}}
            checkpoint: {{frequency: 1, keep: 2}}
            tracking: {{uri: "{uri}", storage: "{tmp_path / 'runs'}", artifacts: "{tmp_path / 'art'}"}}
        """))
        cli = shlex.join(ORCHESTRA)
        launch_cmd = f"cd {tmp_path} && {cli} launch sweep.yaml --slurm --nodes 2 --cpus-per-node 1"

        first = cluster.sh(launch_cmd)
        assert first.returncode == 0, first.stdout + first.stderr
        job1 = first.stdout.split("submitted Slurm job ", 1)[1].split()[0]
        (launch_dir,) = (tmp_path / "runs").iterdir()
        assert (launch_dir / "slurm" / "launch.sbatch").is_file()
        assert oct((launch_dir / "slurm" / "ray_token").stat().st_mode & 0o777) == "0o600"

        def two_iterations_logged() -> bool:
            client, _, children = _mlflow(uri, "slurm_sweep")
            return (len(children) == 2 and all(_steps(client, c.info.run_id) == [STEPS, 2 * STEPS] for c in children)
                    and _checkpoints_named(launch_dir))

        wait_for(two_iterations_logged, 900, f"both trials at the gate, logged and checkpointed (log: "
                                             f"{launch_dir}/slurm/slurm-{job1}.out)", interval=2,
                 fail=cluster.check_daemons)
        # one trial per node: each Ray node has one CPU and each trial asks for one
        assert sorted(_first_node_ips(launch_dir)) == sorted([head.ip, worker.ip])
        status = cluster.sh(f"{cli} status {job1} --slurm")
        assert status.returncode == 0 and "status: RUNNING" in status.stdout, status.stdout + status.stderr

        stop = cluster.sh(f"{cli} stop {job1} --slurm")
        assert stop.returncode == 0 and stop.stdout.strip() == f"{job1}: CANCELLED", stop.stdout + stop.stderr
        for host in (head, worker):  # the allocation's Ray is gone with the job
            S.wait_gone(host, RAY_MARKERS)
        client, parents, children = _mlflow(uri, "slurm_sweep")
        assert len(children) == 2 and all(_steps(client, c.info.run_id) == [STEPS, 2 * STEPS] for c in children)
        assert not (launch_dir / "slurm" / f"driver-{job1}.exit").exists()

        gate.write_text("go")
        second = cluster.sh(launch_cmd)
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"resuming launch {launch_dir.name}" in second.stdout, second.stdout
        job2 = second.stdout.split("submitted Slurm job ", 1)[1].split()[0]
        assert job2 != job1
        exit_file = launch_dir / "slurm" / f"driver-{job2}.exit"
        wait_for(exit_file.exists, 900, f"the resumed job's driver to finish (log: {launch_dir}/slurm/slurm-{job2}.out)",
                 interval=2, fail=cluster.check_daemons)
        log = (launch_dir / "slurm" / f"slurm-{job2}.out").read_text()
        assert exit_file.read_text().strip() == "0", log[-5000:]

        client, parents, children = _mlflow(uri, "slurm_sweep")
        assert len(parents) == 1 and "orchestra.resumed" in parents[0].data.tags, "the same launch, resumed"
        assert len(children) == 2, "each trial once in MLflow"
        for c in children:
            assert c.info.status == "FINISHED"
            assert _steps(client, c.info.run_id) == [STEPS * i for i in range(1, N_ITER + 1)]
        done = cluster.sh(f"{cli} status {job2} --slurm")
        wait_for(lambda: "status: COMPLETED" in cluster.sh(f"{cli} status {job2} --slurm").stdout, 300,
                 f"Slurm job {job2} COMPLETED ({done.stdout})")
        # the launch finished: the next launch of the spec is a new one
        again = cluster.sh(f"cd {tmp_path} && {cli} launch sweep.yaml --slurm --nodes 2 --dry-run")
        assert again.returncode == 0 and "resuming" not in again.stdout
        assert f"--job-name={launch_dir.name}" not in again.stdout
    finally:
        cluster.close()
