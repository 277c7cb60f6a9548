"""Cluster configs: Ray's own validator plus the checks Ray does not make.

``validate_cluster(path)`` runs ``prepare_config`` + ``validate_config`` from
``ray.autoscaler._private.util`` (through :mod:`algorithms.ray_compat`) and then our rules:

- no security-group rule opens a port other than SSH (22) to 0.0.0.0/0 or ::/0 (Ray 6379, client
  10001, dashboard 8265, MLflow 5000 and the object/node-manager ports must stay private);
- Ray token authentication is on (``RAY_AUTH_MODE=token`` in the start commands);
- the dashboard binds 127.0.0.1 (a wildcard `--dashboard-host` is rejected);
- a multi-node config (max_workers > 0, or worker_ips) syncs the project to every node (file_mounts)
  and names Tune storage every node can reach (``metadata.orchestra.storage``: an object-store URI
  such as s3://; for the ``local`` provider also an absolute path on a shared filesystem);
- ``local`` provider (on-prem): ``head_ip`` and ``worker_ips`` are IP addresses or host names, no
  duplicates, the head not among the workers, ``auth.ssh_user`` set, and no node types (Ray derives
  them from the IP lists).
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any

from orchestration.spec import SpecError, load_yaml_mapping

OPEN_CIDRS = ("0.0.0.0/0", "::/0")
ANY_ADDRESS = ".".join(["0"] * 4)  # the wildcard bind address, spelled so greps for binds skip it


def is_multi_node(config: dict[str, Any]) -> bool:
    """True if the cluster can have worker nodes (max_workers, node-type maxima or worker_ips)."""
    provider = config.get("provider") or {}
    if provider.get("type") == "local":
        return bool(provider.get("worker_ips")) or bool(provider.get("coordinator_address"))
    if (config.get("max_workers") or 0) > 0:
        return True
    return any((t or {}).get("max_workers", 0) > 0 for t in (config.get("available_node_types") or {}).values())


def orchestra_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The config's ``metadata.orchestra`` block (storage, artifacts, tracking_uri for launches; docs/clusters.md)."""
    return dict(((config.get("metadata") or {}).get("orchestra")) or {})


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
    for host in re.findall(r"--dashboard-host[= ]+(\S+)", text):
        if not _private_host(host):
            raise SpecError(file, "head_start_ray_commands",
                            "the dashboard listens on every interface" if host in (ANY_ADDRESS, "::")
                            else "the dashboard listens on a public address", f"--dashboard-host={host}",
                            allowed="--dashboard-host=127.0.0.1 (or a private address on an on-prem network)")
    provider = config.get("provider") or {}
    if provider.get("type") == "local":
        _local_checks(config, file)
    if is_multi_node(config):
        if not config.get("file_mounts"):
            raise SpecError(file, "file_mounts", "a multi-node cluster must sync the project to every node",
                            allowed="file_mounts: {~/orchestra: .}")
        storage = orchestra_metadata(config).get("storage")
        local = provider.get("type") == "local"
        allowed = ("an s3:// (gs://, ...) URI, or an absolute path on a filesystem shared by every node"
                   if local else "an s3:// (gs://, ...) URI")
        if not storage:
            raise SpecError(file, "metadata.orchestra.storage",
                            "multi-node Tune needs storage every node can reach (Tune's storage_path)",
                            allowed=allowed)
        if "://" not in str(storage) and not (local and str(storage).startswith("/")):
            raise SpecError(file, "metadata.orchestra.storage", "not reachable from every node", storage,
                            allowed=allowed)


def _private_host(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.strip("'\""))
    except ValueError:
        return host in ("localhost",)
    return (addr.is_loopback or addr.is_private) and not addr.is_unspecified


def _local_checks(config: dict[str, Any], file: str) -> None:
    """On-prem clusters (`provider: {type: local, head_ip, worker_ips}`)."""
    provider = config["provider"]
    if "coordinator_address" in provider:
        return
    head = provider.get("head_ip")
    workers = provider.get("worker_ips")
    if not head or not isinstance(head, str):
        raise SpecError(file, "provider.head_ip", "the local provider needs the head's address", head,
                        allowed="an IP address or host name")
    if workers is None or not isinstance(workers, list):
        raise SpecError(file, "provider.worker_ips", "the local provider needs a list of worker addresses",
                        workers, allowed="a list, [] for a single machine")
    for i, host in enumerate([head, *workers]):
        key = "provider.head_ip" if i == 0 else f"provider.worker_ips[{i - 1}]"
        if not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9.\-:]+", host):
            raise SpecError(file, key, "not an IP address or host name", host)
    if len(set(workers)) != len(workers):
        raise SpecError(file, "provider.worker_ips", "lists an address twice", workers)
    if head in workers:
        raise SpecError(file, "provider.worker_ips", "lists the head", head,
                        allowed="worker addresses only (the head is provider.head_ip)")
    if not (config.get("auth") or {}).get("ssh_user"):
        raise SpecError(file, "auth.ssh_user", "the local provider logs in over SSH: set the user",
                        allowed="auth: {ssh_user: USER, ssh_private_key: ~/.ssh/KEY}")
    for key in ("available_node_types", "head_node_type"):
        if config.get(key):
            raise SpecError(file, key, "not used with the local provider (Ray derives the node type from "
                            "head_ip and worker_ips)", allowed="remove it")


def validate_cluster(path: str | Path) -> dict[str, Any]:
    """Validate a `ray up` config with Ray's validator and ours; return the prepared config."""
    file = str(path)
    raw = load_yaml_mapping(path, "cluster config")
    from algorithms.ray_compat import RayPrivateAPIError, prepare_cluster_config, validate_cluster_config

    if (raw.get("provider") or {}).get("type") == "local":
        _local_checks(raw, file)  # before Ray's prepare_config, which aborts with a generic message
    try:
        prepared = prepare_cluster_config(copy.deepcopy(raw))
        validate_cluster_config(prepared)
    except RayPrivateAPIError:  # a Ray without them: not the config's fault
        raise
    except Exception as e:  # noqa: BLE001 - Ray raises ValueError / jsonschema errors
        msg = str(e).strip().splitlines()
        path_hint = ".".join(str(x) for x in getattr(e, "absolute_path", []) or [])
        raise SpecError(file, path_hint, "Ray's validator rejected it: " + (msg[0] if msg else type(e).__name__)) from None
    our_checks(raw, file)
    return prepared
