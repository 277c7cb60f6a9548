"""Real multi-node Ray on this machine: every node is a test host in its own network, PID and mount
namespaces (tests/netns.py), addresses 10.213.0.x created by the test; nothing else is contacted.

1. A Tune sweep through `orchestra run --address` runs trials on both nodes (node IPs recorded per
   trial result); a trial asking for a custom resource only node B has lands on B; MLflow (SQLite on
   the head) holds every trial.
2. The worker node dies mid-sweep (its PID namespace's init is SIGKILLed): its trials are retried on
   the head per the spec's `failure.max_retries`; MLflow ends with every trial once and a gap-free,
   duplicate-free step history.
3. `ray up` of a local-provider config (sshd in each namespace) by `orchestra launch` of a small spec
   (tracking credentials in the job's env_vars only), `orchestra ui --cluster` forwarding the head's
   MLflow server and dashboard over SSH until SIGTERM, `ray down`; nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
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


class LocalCluster:
    """What :func:`launched_cluster` made: the hosts, the cluster file, the head's MLflow store, the launch."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.fixture(scope="module")
def launched_cluster(tmp_path_factory):
    """sshd on head (a) and worker (b), client (c); `orchestra launch` of a small spec from c starts the
    local-provider cluster with `ray up` and runs the spec as a Ray Job, with tracking credentials from a
    credentials file (the head's MLflow server has no auth: they only travel)."""
    t0 = time.time()
    _ensure_ssh_tools()
    tmp_path = tmp_path_factory.mktemp("local_provider")
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
        password = "test-only-mlflow-password-5b1e"  # must reach the job's env_vars and nothing printed
        creds = tmp_path / "mlflow-credentials.ini"
        creds.write_text(f"[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = {password}\n")
        creds.chmod(0o600)
        spec = _spec(tmp_path / "small.yaml", "mn_launch", f"""
            task: regression_demo
            config: {{lr: 0.05}}
            seeds: [0, 1]
            stop: {{training_iteration: 3}}
            resources: {{cpus: 1}}
            tracking: {{credentials_file: "{creds}"}}
        """)
        cli = " ".join(ORCHESTRA)
        res = c.run(f"cd {tmp_path} && {cli} launch {spec} --cluster {cfg} --project-dir {ROOT}", timeout=1200)
        out = res.stdout + res.stderr
        (tmp_path / "launch.log").write_text(out)
        assert res.returncode == 0, out[-6000:]
        job = next(line.split()[2] for line in out.splitlines() if line.startswith("submitted job "))
        print(f"\n[multinode] ray up + launch wall time {time.time() - t0:.1f}s")
        yield LocalCluster(lab=lab, a=a, b=b, c=c, root=tmp_path, cfg=cfg, db=db, cli=cli, out=out, job=job,
                           password=password)
    finally:
        lab.close()  # kills sshd, the MLflow server and anything `ray down` left, by PID namespace


@pytest.mark.slow
class TestLocalProvider:
    """In order: the launch that started the cluster, `orchestra ui --cluster` on it, `ray down`."""

    def test_ray_up_and_launch_on_local_provider(self, launched_cluster):
        k = launched_cluster
        out, job, c = k.out, k.job, k.c
        assert "ray up -y" in out and "SUCCEEDED" in out, out[-3000:]
        assert f"orchestra ui mn_launch --cluster {k.cfg}" in out, out[-3000:]  # how to open the UI
        status = c.run(f"cd {k.root} && {k.cli} status {job} --cluster {k.cfg}", timeout=600)
        assert status.returncode == 0 and "status: SUCCEEDED" in status.stdout, status.stdout + status.stderr
        # the credentials travelled in the job's env_vars only: nothing printed holds the password
        assert k.password not in out and k.password not in status.stdout + status.stderr
        assert "--set tracking.credentials_file=null" in status.stdout

        client, parents, children = _mlflow(f"sqlite:///{k.db}", "mn_launch")
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
        assert (k.root / "cluster-runs" / job).is_dir()  # Tune storage from the cluster's metadata

        # The head's autoscaler brought up the worker over SSH.
        wait_for(lambda: any("raylet" in p for p in k.b.procs()), 300, "a raylet on the worker node")

    def test_ui_cluster_forwards_head_mlflow_and_dashboard_until_sigterm(self, launched_cluster):
        """`orchestra ui --cluster` on the client: the head's loopback MLflow server and dashboard on free
        local ports over one ssh; the MLflow REST API through it lists the head store's experiments, the
        dashboard answers (its Jobs API shows the launch's credentials in the job's env_vars); SIGTERM
        closes both ports and the ssh process is gone."""
        from mlflow import MlflowClient

        k = launched_cluster
        head_store = MlflowClient(f"sqlite:///{k.db}")
        exp_id = head_store.create_experiment(f"mn_ui_{k.lab.tag}")  # in the head's store, not through the tunnel
        log = k.root / "ui.log"
        ui = k.c.popen(f"cd {k.root} && exec {k.cli} ui mn_ui_{k.lab.tag} --cluster {k.cfg}", log=log)
        try:
            def urls():
                text = log.read_text()
                m = re.search(r"MLflow UI: http://127\.0\.0\.1:(\d+)", text)
                d = re.search(r"Ray dashboard: http://127\.0\.0\.1:(\d+)", text)
                assert ui.poll() is None, text[-3000:]
                return (int(m.group(1)), int(d.group(1))) if m and d else None

            mport, dport = wait_for(urls, 300, "orchestra ui --cluster printing its URLs")
            text = log.read_text()
            assert f"http://127.0.0.1:{mport}/#/experiments/{exp_id}/runs?" in text, text
            assert mport != 5000 and dport != 8265 and mport != dport  # free local ports, not the remote ones
            token = (k.c.home / ".ray" / "auth_token").read_text().strip()
            probe = textwrap.dedent(f"""
                import json, urllib.request as u
                def get(url, headers={{}}):
                    with u.urlopen(u.Request(url, headers=headers), timeout=30) as r:
                        return r.status, json.loads(r.read())
                s, exps = get("http://127.0.0.1:{mport}/api/2.0/mlflow/experiments/search?max_results=1000")
                auth = {{"Authorization": "Bearer {token}"}}
                v, version = get("http://127.0.0.1:{dport}/api/version", auth)
                j, jobs = get("http://127.0.0.1:{dport}/api/jobs/", auth)
                print(json.dumps({{"mlflow": s, "names": sorted(e["name"] for e in exps["experiments"]),
                                  "dashboard": v, "ray": version.get("ray_version"), "jobs": j,
                                  "env": {{x["submission_id"]: (x.get("runtime_env") or {{}}).get("env_vars")
                                          for x in jobs}}}}))
            """)

            def answered():
                res = k.c.run([sys.executable, "-c", probe], timeout=120)
                assert res.returncode == 0, res.stderr[-2000:]
                return json.loads(res.stdout.strip().splitlines()[-1])

            got = wait_for(answered, 300, "the forwarded MLflow server and dashboard answering")
            from ray import __version__ as ray_version

            assert got["mlflow"] == 200 and got["dashboard"] == 200 and got["jobs"] == 200
            assert got["names"] == sorted(e.name for e in head_store.search_experiments())  # the head's store
            assert {"mn_launch", f"mn_ui_{k.lab.tag}"} <= set(got["names"])
            assert got["ray"] == ray_version
            env = got["env"][k.job]
            assert env["MLFLOW_TRACKING_USERNAME"] == "alice" and env["MLFLOW_TRACKING_PASSWORD"] == k.password

            pids = [int(p.split()[0]) for p in k.c.procs() if "orchestration.cli ui" in p]
            ssh = [int(p.split()[0]) for p in k.c.procs() if p.split()[1] == "ssh" and f":{mport}:" in p]
            assert len(pids) == 1 and len(ssh) == 1, k.c.procs()
            os.kill(pids[0], signal.SIGTERM)
            assert ui.wait(120) == 0, log.read_text()[-3000:]
        finally:
            if ui.poll() is None:
                ui.kill()
        assert not Path(f"/proc/{ssh[0]}").exists()
        assert not any(p.split()[1] == "ssh" for p in k.c.procs()), k.c.procs()
        assert not _port_open(k.c, "127.0.0.1", mport) and not _port_open(k.c, "127.0.0.1", dport)
        assert k.password not in log.read_text()

    def test_ray_down_stops_ray_on_the_head(self, launched_cluster):
        k = launched_cluster
        down = k.c.run(f"ray down -y {k.cfg}", timeout=600)
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]

        def ray_procs(h) -> list[str]:
            return [p for p in h.procs() if any(m in p for m in RAY_PROCESS_MARKERS)]

        wait_for(lambda: not ray_procs(k.a), 300, "no Ray process left on the head after ray down")
        # `ray down` returns 0 but (local provider) only marks workers terminated in its state file:
        # Ray keeps running on them. Check and kill everything left by PID (sshd, the MLflow server
        # and, on the worker, Ray), then nothing may remain in either host.
        left = {h.ip: ray_procs(h) for h in (k.a, k.b)}
        for h in (k.a, k.b):
            for pid in h.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_for(lambda h=h: not h.pids(), 300, f"every process on {h.ip} killed")
        print(f"\n[multinode] Ray processes left by `ray down` (killed by PID): {left}")


def test_ui_cluster_unreachable_head_is_one_line_exit_2(tmp_path):
    """A head nobody answers SSH on (the client host's own address, no sshd): one line naming the
    head's user@host, exit 2; and a missing cluster file the same way."""
    lab = Lab(tmp_path / "lab")
    try:
        c = lab.add_host("c", 3)
        cfg = tmp_path / "unreachable.yaml"
        cfg.write_text(yaml.safe_dump({
            "cluster_name": "orchtest-unreachable",
            "provider": {"type": "local", "head_ip": CLIENT_IP, "worker_ips": []},
            "auth": {"ssh_user": "root", "ssh_private_key": str(tmp_path / "no-such-key")},
            "head_start_ray_commands": ["RAY_AUTH_MODE=token ray start --head --dashboard-host=127.0.0.1"],
        }))
        cli = " ".join(ORCHESTRA)
        res = c.run(f"cd {tmp_path} && {cli} ui --cluster {cfg}", timeout=300)
        err = res.stderr.strip()
        assert res.returncode == 2 and len(err.splitlines()) == 1, res.stdout + res.stderr
        assert err.startswith(f"error: {cfg}: cannot reach the head of cluster 'orchtest-unreachable' over SSH "
                              f"as root@{CLIENT_IP}") and "Connection refused" in err, err
        assert not any(p.split()[1] == "ssh" for p in c.procs())
        missing = c.run(f"cd {tmp_path} && {cli} ui --cluster {tmp_path / 'nope.yaml'}", timeout=300)
        line = missing.stderr.strip()
        assert missing.returncode == 2 and len(line.splitlines()) == 1, missing.stdout + missing.stderr
        assert line.startswith(f"error: {tmp_path / 'nope.yaml'}:") and "not found" in line, line
    finally:
        lab.close()
