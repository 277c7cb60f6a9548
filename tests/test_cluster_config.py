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
