"""Real multi-node Ray on this machine: every node is a test host in its own network, PID and mount
namespaces (tests/netns.py), addresses 10.213.0.x created by the test; nothing else is contacted.

1. A Tune sweep through `orchestra run --address` runs trials on both nodes (node IPs recorded per
   trial result); a trial asking for a custom resource only node B has lands on B; MLflow (SQLite on
   the head) holds every trial.
2. The worker node dies mid-sweep (its PID namespace's init is SIGKILLed): its trials are retried on
   the head per the spec's `failure.max_retries`; MLflow ends with every trial once and a gap-free,
   duplicate-free step history.
3. `ray up` of a local-provider config (sshd in each namespace), `orchestra launch` of a small spec,
   `ray down`; nothing is left running.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from netns import ROOT, Lab, have_namespaces, ray_env, wait_for

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(1500)]
_skip = have_namespaces()
if _skip:
    pytestmark.append(pytest.mark.skip(reason=_skip))

HEAD_IP, WORKER_IP, CLIENT_IP = "10.213.0.1", "10.213.0.2", "10.213.0.3"
TOKEN = "orchestra-test-token-0123456789abcdef"  # test-only cluster secret
ORCHESTRA = [sys.executable, "-m", "orchestration.cli"]
STEPS_PER_ITER = 600


def _write_token(host) -> None:
    (host.home / ".ray").mkdir(exist_ok=True)
    (host.home / ".ray" / "auth_token").write_text(TOKEN)


def _retried(cmd: str, attempts: int = 3) -> str:
    """``cmd`` again if it fails (stopping Ray first, inside the test host's PID namespace only): `ray
    start` gives the raylet a fixed 30 s to register with the GCS, too little on a loaded 2-core machine."""
    return " || ".join([f"({cmd})"] + [f"(ray stop --force; sleep 2; {cmd})"] * (attempts - 1))  # in the host's namespace


def _ray_start(host, args: str, timeout: float = 900) -> None:
    res = host.run(_retried(f"ray start --disable-usage-stats {args}"), timeout=timeout)
    assert res.returncode == 0, f"ray start on {host.ip} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def _start_worker(b) -> None:
    _ray_start(b, f"--address={HEAD_IP}:6379 --node-ip-address={WORKER_IP} --num-cpus=1 "
                  "--resources='{\"node_b\": 1}'")


def _nodes_alive(a) -> int:
    code = (f"import ray; ray.init(address='{HEAD_IP}:6379', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    res = a.run([sys.executable, "-c", code], timeout=300)
    return int(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else -1


@pytest.fixture(scope="class")
def two_nodes(tmp_path_factory):
    """Head on 10.213.0.1 (1 CPU) and worker on 10.213.0.2 (1 CPU, resource node_b), token auth."""
    root = tmp_path_factory.mktemp("two_nodes")
    lab = Lab(root / "lab")
    try:
        a = lab.add_host("a", 1)
        b = lab.add_host("b", 2)
        for h in (a, b):
            _write_token(h)
        _ray_start(a, f"--head --node-ip-address={HEAD_IP} --port=6379 --num-cpus=1 --include-dashboard=false")
        _start_worker(b)
        wait_for(lambda: _nodes_alive(a) == 2, 300, "two alive Ray nodes")
        yield lab, a, b, root
    finally:
        lab.close()


def _spec(path: Path, name: str, body: str) -> Path:
    path.write_text(f"name: {name}\n" + textwrap.dedent(body))
    return path


def _orchestra_run(a, spec: Path, cwd: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return a.run(["bash", "-c", f"cd {cwd} && " + shlex.join(
        [*ORCHESTRA, "run", str(spec), "--address", f"{HEAD_IP}:6379", *extra])], timeout=timeout)


def _trial_nodes(launch_dir: Path) -> dict[str, list[str]]:
    """Trial dir name -> node_ip of each result Tune recorded (result.json lines, in order)."""
    out = {}
    for rj in sorted(launch_dir.glob("*/result.json")):
        rows = [json.loads(line) for line in rj.read_text().splitlines() if line.strip()]
        out[rj.parent.name] = [r["node_ip"] for r in rows]
    return out


def _mlflow(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if r.data.tags.get("orchestra.run_type") == "launch"]
    return client, parents, children


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


@pytest.mark.usefixtures("two_nodes")
class TestTwoNodes:
    def test_sweep_runs_trials_on_both_nodes_and_custom_resource_pins_node(self, two_nodes, tmp_path):
        t0 = time.time()
        _, a, b, _ = two_nodes
        uri = f"sqlite:///{tmp_path / 'head-mlruns' / 'mlflow.db'}"
        spec = _spec(tmp_path / "sweep.yaml", "mn_sweep", f"""
            task: regression_demo
            config: {{lr: {{grid: [0.02, 0.05]}}, steps_per_iteration: {STEPS_PER_ITER}}}
            seeds: [0]
            stop: {{training_iteration: 4}}
            resources: {{cpus: 1}}
            tracking: {{uri: "{uri}", storage: "{tmp_path / 'runs'}", artifacts: "{tmp_path / 'art'}"}}
        """)
        res = _orchestra_run(a, spec, tmp_path)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        (launch_dir,) = (tmp_path / "runs").iterdir()
        nodes = _trial_nodes(launch_dir)
        assert len(nodes) == 2 and all(len(v) == 4 for v in nodes.values()), nodes
        assert {ip for ips in nodes.values() for ip in ips} == {HEAD_IP, WORKER_IP}, nodes

        client, parents, children = _mlflow(uri, "mn_sweep")
        assert len(parents) == 1 and len(children) == 2
        for c in children:
            assert c.info.status == "FINISHED"
            assert _steps(client, c.info.run_id, "train/loss") == [STEPS_PER_ITER * i for i in range(1, 5)]

        # Only node B has the custom resource `node_b`: every trial lands there.
        res = _orchestra_run(a, spec, tmp_path, "--set", "name=mn_pinned", "--set", "resources.custom={node_b: 1}",
                             "--set", "config.lr=0.05", "--set", "stop.training_iteration=2")
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        pinned = next(d for d in (tmp_path / "runs").iterdir() if d.name.startswith("mn_pinned"))
        nodes = _trial_nodes(pinned)
        assert len(nodes) == 1 and {ip for ips in nodes.values() for ip in ips} == {WORKER_IP}, nodes
        print(f"\n[multinode] test 1 wall time {time.time() - t0:.1f}s")

    def test_worker_node_dies_mid_sweep_trials_retry_on_head(self, two_nodes, tmp_path):
        t0 = time.time()
        lab, a, b, _ = two_nodes
        if not b.alive() or _nodes_alive(a) != 2:  # run on its own or after a failure: bring B back
            pytest.fail("worker host not alive at test start")
        uri = f"sqlite:///{tmp_path / 'head-mlruns' / 'mlflow.db'}"
        n_iter = 10
        # Trials wait before iteration 3 until `release` exists (created once node B is dead): the node
        # dies while its trial is still running, however fast the trials are.
        shutil.copy(Path(__file__).with_name("gated_task.py"), tmp_path / "gated_task.py")
        release = tmp_path / "release"
        spec = _spec(tmp_path / "ft.yaml", "mn_ft", f"""
            task: gated_regression
            imports: [gated_task]
            config: {{lr: 0.05, steps_per_iteration: {STEPS_PER_ITER}, gate_iteration: 3, gate_file: "{release}"}}
            seeds: [0, 1]
            stop: {{training_iteration: {n_iter}}}
            resources: {{cpus: 1}}
            checkpoint: {{frequency: 1, keep: 2}}
            failure: {{max_retries: 3}}
            tracking: {{uri: "{uri}", storage: "{tmp_path / 'runs'}", artifacts: "{tmp_path / 'art'}"}}
        """)
        log = tmp_path / "driver.log"
        driver = a.popen(["bash", "-c", f"cd {tmp_path} && " + shlex.join(
            [*ORCHESTRA, "run", str(spec), "--address", f"{HEAD_IP}:6379"])], log=log)
        try:
            def worker_trial_progressed() -> bool:
                launches = list((tmp_path / "runs").glob("mn_ft-*"))
                if not launches:
                    return False
                nodes = _trial_nodes(launches[0])
                return any(len(ips) >= 2 and ips[-1] == WORKER_IP for ips in nodes.values())

            wait_for(worker_trial_progressed, 600, "a trial on the worker node with 2 results")
            b.kill()  # every process of the worker node: raylet, workers, the trial actor
            assert not b.pids()
            release.write_text("go")  # the trial on the head, and the retry of B's, go on
            driver.wait(900)
        finally:
            if driver.poll() is None:
                driver.kill()
        out = log.read_text()
        assert driver.returncode == 0, out[-5000:]
        (launch_dir,) = (tmp_path / "runs").iterdir()
        nodes = _trial_nodes(launch_dir)
        moved = [ips for ips in nodes.values() if WORKER_IP in ips]
        assert moved and all(ips[-1] == HEAD_IP for ips in moved), nodes  # retried on the head
        client, parents, children = _mlflow(uri, "mn_ft")
        assert len(parents) == 1 and len(children) == 2, "each trial exactly once in MLflow"
        for c in children:
            assert c.info.status == "FINISHED"
            assert _steps(client, c.info.run_id, "train/loss") == [STEPS_PER_ITER * i for i in range(1, n_iter + 1)]
        print(f"\n[multinode] test 2 wall time {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------
# 3. ray up (local provider over SSH) -> orchestra launch -> ray down
# ----------------------------------------------------------------------------------------------
def _ensure_ssh_tools() -> None:
    """openssh-server and rsync from Debian packages (`ray up` with the local provider needs both)."""
    if Path("/usr/sbin/sshd").exists() and shutil.which("rsync") and shutil.which("ssh"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=900, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server",
                    "openssh-client", "rsync"], env=env, check=True, timeout=900, capture_output=True)


def _bashrc(extra: str = "") -> str:
    env = ray_env()
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items() if k not in ("HOME", "LANG")]
    return "# test host login environment (remote commands run in a login shell)\n" + "\n".join(lines) + "\n" + extra


def _start_sshd(host, root: Path, pubkey: str) -> None:
    ssh = host.home / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(pubkey)
    (ssh / "authorized_keys").chmod(0o600)
    (host.home / ".bashrc").write_text(_bashrc())
    (host.home / ".profile").write_text("[ -f ~/.bashrc ] && . ~/.bashrc\n")
    cfg = host.dir / "sshd_config"
    cfg.write_text(textwrap.dedent(f"""\
        Port 22
        ListenAddress {host.ip}
        HostKey {root / 'hostkey'}
        PermitRootLogin prohibit-password
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        PidFile none
        MaxStartups 50
        MaxSessions 50
    """))
    host.run(["mkdir", "-p", "/run/sshd"], check=True)
    host.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], log=host.dir / "sshd.log")


def _port_open(client, ip: str, port: int) -> bool:
    code = f"import socket; s = socket.create_connection(('{ip}', {port}), timeout=3); s.close()"
    return client.run([sys.executable, "-c", code], timeout=60).returncode == 0


RAY_PROCESS_MARKERS = ("raylet", "gcs_server", "ray::", "dashboard", "log_monitor", "monitor.py",
                       "ray.util.client", "runtime_env", "default_worker")


def test_ray_up_launch_and_ray_down_on_local_provider(tmp_path):
    t0 = time.time()
    _ensure_ssh_tools()
    lab = Lab(tmp_path / "lab")
    try:
        a, b, c = lab.add_host("a", 1), lab.add_host("b", 2), lab.add_host("c", 3)
        key = tmp_path / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hostkey")],
                       check=True, timeout=60)
        pub = (tmp_path / "id_ed25519.pub").read_text()
        for h in (a, b):
            _start_sshd(h, tmp_path, pub)
        (c.home / ".bashrc").write_text(_bashrc())
        # The cluster token, made on the client as a user would; file_mounts copies it to every node.
        tok = c.run("ray get-auth-token --generate", timeout=300)
        assert tok.returncode == 0 and (c.home / ".ray" / "auth_token").exists(), tok.stderr[-2000:]
        wait_for(lambda: _port_open(c, HEAD_IP, 22) and _port_open(c, WORKER_IP, 22), 300, "sshd on both nodes")

        db = tmp_path / "head-mlflow.db"
        health = ("python -c \"import time, urllib.request as u\n"  # poll, then fail loudly
                  "deadline = time.time() + 600\n"
                  "while True:\n"
                  "    try: u.urlopen('http://127.0.0.1:5000/health', timeout=10); break\n"
                  "    except OSError:\n"
                  "        if time.time() > deadline: raise SystemExit('mlflow server on the head not healthy')\n"
                  "        time.sleep(1)\"")
        cluster = {
            "cluster_name": f"orchtest-{lab.tag}",
            "provider": {"type": "local", "head_ip": HEAD_IP, "worker_ips": [WORKER_IP]},
            "auth": {"ssh_user": "root", "ssh_private_key": str(key)},
            "min_workers": 1, "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "metadata": {"orchestra": {"storage": str(tmp_path / "cluster-runs"),
                                       "artifacts": str(tmp_path / "cluster-artifacts"),
                                       "tracking_uri": "http://127.0.0.1:5000"}},
            "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
            "rsync_exclude": [".venv", "runs", "mlruns", "**/__pycache__", ".git"],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [
                "ray stop",  # runs over SSH inside the head test host's own PID namespace
                _retried(f"RAY_AUTH_MODE=token ray start --head --port=6379 --node-ip-address={HEAD_IP} "
                         "--num-cpus=1 --dashboard-host=127.0.0.1 --autoscaling-config=~/ray_bootstrap_config.yaml "
                         "--disable-usage-stats"),
                f"mkdir -p ~/mlruns && (nohup mlflow server --host 127.0.0.1 --port 5000 --workers 1 "
                f"--backend-store-uri sqlite:///{db} --default-artifact-root {tmp_path / 'cluster-artifacts'} "
                "> ~/mlruns/server.log 2>&1 & echo $! > ~/mlruns/server.pid)",
                health,
            ],
            "worker_start_ray_commands": [
                "ray stop",  # runs over SSH inside the worker test host's own PID namespace
                _retried(f"RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379 --node-ip-address={WORKER_IP} "
                         "--num-cpus=1 --resources='{\"node_b\": 1}' --disable-usage-stats"),
            ],
        }
        cfg = tmp_path / "cluster-test.yaml"
        cfg.write_text(yaml.safe_dump(cluster, sort_keys=False))
        spec = _spec(tmp_path / "small.yaml", "mn_launch", """
            task: regression_demo
            config: {lr: 0.05}
            seeds: [0, 1]
            stop: {training_iteration: 3}
            resources: {cpus: 1}
        """)
        cli = " ".join(ORCHESTRA)
        res = c.run(f"cd {tmp_path} && {cli} launch {spec} --cluster {cfg} --project-dir {ROOT}", timeout=1200)
        out = res.stdout + res.stderr
        (tmp_path / "launch.log").write_text(out)
        assert res.returncode == 0, out[-6000:]
        assert "ray up -y" in out and "SUCCEEDED" in out and "ray attach" in out, out[-3000:]
        job = next(line.split()[2] for line in out.splitlines() if line.startswith("submitted job "))

        status = c.run(f"cd {tmp_path} && {cli} status {job} --cluster {cfg}", timeout=600)
        assert status.returncode == 0 and "status: SUCCEEDED" in status.stdout, status.stdout + status.stderr

        client, parents, children = _mlflow(f"sqlite:///{db}", "mn_launch")
        assert len(parents) == 1 and parents[0].data.tags["orchestra.launch_id"] == job
        from orchestration.runner import _git_commit

        recorded = parents[0].data.tags["orchestra.git_commit"]  # recorded at launch, passed to the job
        if _git_commit(ROOT) == "unknown":  # not a git checkout
            assert recorded == "unknown"
        else:  # HEAD at launch time: the current HEAD or one of its ancestors (others may commit meanwhile)
            sha = recorded.removesuffix("-dirty")
            assert len(sha) == 40 and subprocess.run(["git", "merge-base", "--is-ancestor", sha, "HEAD"],
                                                     cwd=ROOT, timeout=60).returncode == 0, recorded
        assert len(children) == 2 and all(ch.info.status == "FINISHED" for ch in children)
        for ch in children:
            assert _steps(client, ch.info.run_id, "train/loss") == [20, 40, 60]
        assert (tmp_path / "cluster-runs" / job).is_dir()  # Tune storage from the cluster's metadata

        # The head's autoscaler brought up the worker over SSH.
        wait_for(lambda: any("raylet" in p for p in b.procs()), 300, "a raylet on the worker node")

        down = c.run(f"ray down -y {cfg}", timeout=600)
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        def ray_procs(h) -> list[str]:
            return [p for p in h.procs() if any(m in p for m in RAY_PROCESS_MARKERS)]

        wait_for(lambda: not ray_procs(a), 300, "no Ray process left on the head after ray down")
        # `ray down` returns 0 but (local provider) only marks workers terminated in its state file:
        # Ray keeps running on them. Check and kill everything left by PID (sshd, the MLflow server
        # and, on the worker, Ray), then nothing may remain in either host.
        left = {h.ip: ray_procs(h) for h in (a, b)}
        for h in (a, b):
            for pid in h.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_for(lambda h=h: not h.pids(), 300, f"every process on {h.ip} killed")
        print(f"\n[multinode] Ray processes left by `ray down` (killed by PID): {left}")
        print(f"\n[multinode] test 3 wall time {time.time() - t0:.1f}s")
    finally:
        lab.close()  # kills sshd, the MLflow server and anything `ray down` left, by PID namespace
