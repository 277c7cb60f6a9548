"""cluster.yaml passes Ray's own validator and ours; broken copies fail with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestration.cluster import validate_cluster
from orchestration.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]


def broken(tmp_path: Path, edit) -> Path:
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    edit(cfg)
    out = tmp_path / "broken.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_shipped_cluster_yaml_is_valid():
    cfg = validate_cluster(ROOT / "cluster.yaml")
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu_types = [n for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) >= 2


def test_ray_validator_rejects_schema_errors(tmp_path: Path):
    def edit(cfg):
        cfg["available_node_types"]["gpu_1x"]["min_workers"] = "many"

    with pytest.raises(SpecError, match="Ray's validator rejected it"):
        validate_cluster(broken(tmp_path, edit))

    def unknown_head(cfg):
        cfg["head_node_type"] = "no_such_type"

    with pytest.raises(SpecError, match="Ray's validator"):
        validate_cluster(broken(tmp_path, unknown_head))


def test_open_ports_and_missing_token_auth_are_rejected(tmp_path: Path):
    def open_dashboard(cfg):
        cfg["provider"]["security_group"]["IpPermissions"].append(
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})

    with pytest.raises(SpecError) as e:
        validate_cluster(broken(tmp_path, open_dashboard))
    assert "IpPermissions[1]" in e.value.key and "8265" in str(e.value)

    def no_token(cfg):
        for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
            cfg[key] = [c.replace("RAY_AUTH_MODE=token", "") for c in cfg[key]]

    with pytest.raises(SpecError, match="token authentication is off"):
        validate_cluster(broken(tmp_path, no_token))

    def public_dashboard(cfg):
        cfg["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
                                          for c in cfg["head_start_ray_commands"]]

    with pytest.raises(SpecError, match="dashboard listens on every interface"):
        validate_cluster(broken(tmp_path, public_dashboard))


def test_shipped_cluster_yaml_has_autoscaling_gpu_types_and_s3_storage():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for name in ("gpu_1x", "gpu_8x"):
        t = raw["available_node_types"][name]
        assert t["min_workers"] == 0 < t["max_workers"] and t["resources"]["GPU"] > 0
    assert raw["metadata"]["orchestra"]["storage"].startswith("s3://")
    assert raw["file_mounts"]["~/.ray/auth_token"]  # the token reaches every node


def test_multi_node_configs_need_reachable_storage(tmp_path: Path):
    def no_storage(cfg):
        del cfg["metadata"]["orchestra"]["storage"]

    with pytest.raises(SpecError) as e:
        validate_cluster(broken(tmp_path, no_storage))
    assert e.value.key == "metadata.orchestra.storage" and "s3://" in str(e.value)

    def local_path(cfg):
        cfg["metadata"]["orchestra"]["storage"] = "/home/ubuntu/runs"

    with pytest.raises(SpecError, match="not reachable from every node"):
        validate_cluster(broken(tmp_path, local_path))

    def single_node(cfg):
        del cfg["metadata"]
        cfg["max_workers"] = 0
        for t in cfg["available_node_types"].values():
            t.pop("min_workers", None)
            t["max_workers"] = 0

    validate_cluster(broken(tmp_path, single_node))  # one machine: the head's disk is fine


def local(tmp_path: Path, edit=None) -> Path:
    cfg = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    if edit:
        edit(cfg)
    out = tmp_path / "local.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_shipped_local_provider_config_is_valid(tmp_path: Path):
    cfg = validate_cluster(ROOT / "cluster-local.yaml")
    (node_type,) = cfg["available_node_types"].values()
    assert node_type["max_workers"] == len(cfg["provider"]["worker_ips"])
    # shared-filesystem storage is allowed on-prem, a relative path is not
    validate_cluster(local(tmp_path, lambda c: c["metadata"]["orchestra"].update(storage="s3://b/runs")))
    with pytest.raises(SpecError, match="not reachable"):
        validate_cluster(local(tmp_path, lambda c: c["metadata"]["orchestra"].update(storage="runs")))


@pytest.mark.parametrize("edit, key, text", [
    (lambda c: c["provider"].pop("head_ip"), "provider.head_ip", "needs the head's address"),
    (lambda c: c["provider"].update(worker_ips="192.168.1.11"), "provider.worker_ips", "list"),
    (lambda c: c["provider"].update(worker_ips=["192.168.1.11", "192.168.1.11"]), "provider.worker_ips", "twice"),
    (lambda c: c["provider"].update(worker_ips=["192.168.1.10"]), "provider.worker_ips", "lists the head"),
    (lambda c: c["provider"].update(worker_ips=["bad host!"]), "provider.worker_ips[0]", "not an IP"),
    (lambda c: c["auth"].pop("ssh_user"), "auth.ssh_user", "SSH"),
    (lambda c: c.update(head_node_type="x"), "head_node_type", "not used with the local provider"),
    (lambda c: c.update(head_start_ray_commands=[x.replace("--dashboard-host=127.0.0.1", "--dashboard-host=8.8.8.8")
                                                 for x in c["head_start_ray_commands"]]),
     "head_start_ray_commands", "public address"),
    (lambda c: c.update(file_mounts={}), "file_mounts", "sync the project"),
])
def test_broken_local_provider_configs_fail_clearly(tmp_path: Path, edit, key, text):
    with pytest.raises(SpecError) as e:
        validate_cluster(local(tmp_path, edit))
    assert e.value.key == key and text in str(e.value), str(e.value)
    assert str(tmp_path / "local.yaml") in str(e.value)


def test_launch_points_the_job_at_head_side_tracking_and_storage(tmp_path: Path):
    import base64

    from orchestration.launch import cluster_info, head_overrides, job_entrypoint, job_runtime_env
    from orchestration.spec import load_spec

    spec = load_spec({"name": "lx", "task": "regression_demo"})
    info = cluster_info(ROOT / "cluster.yaml")
    assert info.multi_node and info.token_auth and info.token_path == Path.home() / ".ray" / "auth_token"
    sets = head_overrides(spec, info)
    assert sets == ["tracking.uri=http://127.0.0.1:5000", "tracking.storage=s3://my-orchestra-bucket/runs",
                    "tracking.artifacts=s3://my-orchestra-bucket/mlflow"]
    assert head_overrides(spec, info, storage="s3://other/x")[1] == "tracking.storage=s3://other/x"
    # what the spec pins to head-ready places is kept
    pinned = load_spec({"name": "lx", "task": "regression_demo",
                        "tracking": {"uri": "http://10.0.0.5:5000", "storage": "s3://mine/runs"}})
    assert head_overrides(pinned, info)[:2] == ["tracking.uri=http://10.0.0.5:5000", "tracking.storage=s3://mine/runs"]
    # multi-node without storage is refused
    info.storage = None
    with pytest.raises(SpecError, match="metadata.orchestra.storage"):
        head_overrides(spec, info)

    inside = job_entrypoint(ROOT / "experiments" / "quickstart.yaml", ROOT, ["seeds=[0, 1]"], "q-1")
    assert inside == "orchestra run experiments/quickstart.yaml --address auto --launch-name q-1 --set 'seeds=[0, 1]'"
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\ntask: regression_demo\n")
    entry = job_entrypoint(outside, ROOT, [], "m-1")
    b64 = entry.split("echo ", 1)[1].split(" ", 1)[0]
    assert base64.b64decode(b64) == outside.read_bytes() and "orchestra run .orchestra/mine.yaml" in entry

    env = job_runtime_env(ROOT, "abc123", "orchestra launch x")
    assert {".venv", "runs", "mlruns", ".git"} <= set(env["excludes"])
    assert env["env_vars"]["ORCHESTRA_GIT_COMMIT"] == "abc123" and env["working_dir"] == str(ROOT)


def test_launch_carries_tracking_credentials_in_env_vars_only(tmp_path: Path, monkeypatch):
    """The job's driver gets the tracking server's credentials as runtime_env env_vars: from the spec's
    credentials file (which Ray's working_dir upload leaves out) or from this process's environment; the
    entrypoint, the recorded command and the job's spec hold neither the password nor the file."""
    import json

    from algorithms.ray_compat import working_dir_excluded
    from orchestration.launch import cluster_info, head_overrides, job_submission
    from orchestration.spec import UserError, load_spec
    from orchestration.tracking.access import PASSWORD_ENV, USERNAME_ENV

    monkeypatch.delenv(USERNAME_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    project = tmp_path / "project"
    (project / "secrets").mkdir(parents=True)
    (project / "experiments").mkdir()
    (project / "experiments" / "x.yaml").write_text("name: x\ntask: regression_demo\n")
    creds = project / "secrets" / "mlflow.ini"
    password = "s3cret-Pa55-only-in-env-vars"
    creds.write_text(f"[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = {password}\n")
    creds.chmod(0o600)
    monkeypatch.chdir(project)  # relative credentials paths are read from the current folder, as `orchestra run` does
    info = cluster_info(ROOT / "cluster.yaml")
    spec_file = project / "experiments" / "x.yaml"
    spec = load_spec(spec_file, ["tracking.credentials_file=secrets/mlflow.ini"])
    sets = ["tracking.credentials_file=secrets/mlflow.ini", *head_overrides(spec, info)]
    assert sets[-1] == "tracking.credentials_file=null"  # the job's spec names no local file
    command = "orchestra launch experiments/x.yaml --cluster cluster.yaml --set tracking.credentials_file=secrets/mlflow.ini"
    payload = job_submission(spec_file, spec, sets, project, "x-1", "abc123", command)

    env = payload["runtime_env"]["env_vars"]
    assert env[USERNAME_ENV] == "alice" and env[PASSWORD_ENV] == password
    assert password not in payload["entrypoint"] and password not in env["ORCHESTRA_COMMAND"]
    assert "--set tracking.credentials_file=null" in payload["entrypoint"]
    assert payload["submission_id"] == "x-1"
    excludes = payload["runtime_env"]["excludes"]
    assert "/secrets/mlflow.ini" in excludes
    assert working_dir_excluded(project, excludes, creds)  # Ray's own packaging skips the file
    assert not working_dir_excluded(project, excludes, spec_file)
    # the whole payload holds the password exactly once: the env var
    assert json.dumps(payload).count(password) == 1

    # without a file: this process's MLFLOW_TRACKING_USERNAME/PASSWORD
    plain = load_spec(spec_file)
    plain_sets = head_overrides(plain, info)
    assert not any("credentials_file" in s for s in plain_sets)
    assert USERNAME_ENV not in job_submission(spec_file, plain, plain_sets, project, "x-2", "abc", "c")["runtime_env"][
        "env_vars"]
    monkeypatch.setenv(USERNAME_ENV, "bob")
    monkeypatch.setenv(PASSWORD_ENV, "bobs-password")
    env = job_submission(spec_file, plain, plain_sets, project, "x-3", "abc", "c")["runtime_env"]["env_vars"]
    assert (env[USERNAME_ENV], env[PASSWORD_ENV]) == ("bob", "bobs-password")
    # a tracking URI that is no server gets no credentials
    local = load_spec(spec_file, ["tracking.uri=sqlite:////tmp/x.db"])
    sets = [s if not s.startswith("tracking.uri=") else "tracking.uri=sqlite:////tmp/x.db"
            for s in head_overrides(local, info)]
    assert PASSWORD_ENV not in job_submission(spec_file, local, sets, project, "x-4", "abc", "c")["runtime_env"][
        "env_vars"]
    # a credentials file others can read is refused before anything is submitted
    creds.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        job_submission(spec_file, spec, head_overrides(spec, info), project, "x-5", "abc", "c")


def test_tunnel_forwards_each_port_from_local_loopback_to_the_heads(tmp_path: Path):
    """`orchestra ui --cluster`'s ssh: the local provider's head and auth from the file, one -L per port from
    127.0.0.1 here to the head's 127.0.0.1, our options before Ray's (ssh keeps an option's first value)."""
    from orchestration.tunnel import Head, dashboard_port, find_head, forward_command

    raw = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    head = find_head("cluster-local.yaml", raw)
    assert head == Head("ubuntu", "192.168.1.10", "~/.ssh/id_ed25519", None) and head.target == "ubuntu@192.168.1.10"
    external = {**raw, "provider": {**raw["provider"], "external_head_ip": "203.0.113.7"}}
    assert find_head("x.yaml", external).host == "203.0.113.7"
    assert dashboard_port(raw) == 8265
    assert dashboard_port({"head_start_ray_commands": ["ray start --head --dashboard-port=8300"]}) == 8300
    cmd = forward_command(head, [(41000, 5000), (41001, 8265)], connect_timeout=9)
    assert cmd[:6] == ["ssh", "-N", "-L", "127.0.0.1:41000:127.0.0.1:5000", "-L", "127.0.0.1:41001:127.0.0.1:8265"]
    assert cmd[-1] == "ubuntu@192.168.1.10" and cmd[cmd.index("-i") + 1] == "~/.ssh/id_ed25519"
    opts = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-o"]
    assert opts[:3] == ["ControlMaster=no", "BatchMode=yes", "LogLevel=ERROR"]
    assert "ExitOnForwardFailure=yes" in opts and "ConnectTimeout=9s" in opts
