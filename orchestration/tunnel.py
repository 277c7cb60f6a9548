"""SSH port forwards from this machine to the loopback of a `ray up` cluster's head.

``ray dashboard FILE`` forwards one port: it finds the head with the cluster's node provider and runs
Ray's SSH command runner with ``port_forward=[(local, remote)]``, i.e. ``ssh -L local:localhost:remote``
with Ray's SSH options (``SSHOptions``: the key of ``auth.ssh_private_key``, no host-key prompt, exit when a
forward fails, keep-alives). :func:`forward_command` builds that command line for several ports at once,
with the same options, so that one ssh process (``orchestra ui --cluster``) carries the MLflow server and
the Ray dashboard and is stopped with its process group. It adds what a tunnel owned by one process needs:
``-N`` (no remote command), ``ControlMaster=no`` (a shared master connection would keep the forwards open
after our ssh exits), ``BatchMode=yes`` (fail instead of prompting) and local ends on 127.0.0.1 only.

The head: the local provider's ``external_head_ip`` or ``head_ip`` (an on-prem head is a fixed machine;
Ray's local-provider state lives only on the machine that ran ``ray up``); every other provider's through
Ray (``get_head_node_ip``, with the SSH key from Ray's bootstrapped config, as ``ray dashboard``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.spec import UserError

DASHBOARD_PORT = 8265  # Ray's default --dashboard-port


@dataclass(frozen=True)
class Head:
    """Where and as whom to SSH into a cluster's head."""

    user: str
    host: str
    ssh_key: str | None = None
    proxy_command: str | None = None

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}"


def find_head(file: str | Path, config: dict[str, Any]) -> Head:
    """The head of the (validated) cluster ``config`` read from ``file``; UserError when Ray's node
    provider knows no running head."""
    provider = config.get("provider") or {}
    if provider.get("type") == "local" and provider.get("head_ip"):
        auth = config.get("auth") or {}
        return Head(str(auth["ssh_user"]), str(provider.get("external_head_ip") or provider["head_ip"]),
                    auth.get("ssh_private_key"), auth.get("ssh_proxy_command"))
    from algorithms.ray_compat import RayPrivateAPIError, bootstrap_cluster_config, head_node_ip

    name = config.get("cluster_name", "default")
    try:
        auth = bootstrap_cluster_config(copy.deepcopy(config)).get("auth") or {}
        host = head_node_ip(str(file))
    except RayPrivateAPIError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray's providers raise RuntimeError, cloud SDK errors, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{file}: no running head of cluster {name!r} found by Ray's {provider.get('type')!r} "
                        f"node provider ({first}); start it with `ray up {file}`") from None
    return Head(str(auth.get("ssh_user") or (config.get("auth") or {}).get("ssh_user")), str(host),
                auth.get("ssh_private_key"), auth.get("ssh_proxy_command"))


def dashboard_port(config: dict[str, Any]) -> int:
    """The head's dashboard port: ``--dashboard-port`` of the head's ``ray start``, else Ray's 8265."""
    text = "\n".join(str(c) for c in config.get("head_start_ray_commands") or [])
    found = re.findall(r"--dashboard-port[= ]+(\d+)", text)
    return int(found[-1]) if found else DASHBOARD_PORT


def forward_command(head: Head, forwards: list[tuple[int, int]], connect_timeout: int = 30) -> list[str]:
    """``ssh -N`` forwarding each ``(local, remote)`` port pair: 127.0.0.1:local here to the head's
    127.0.0.1:remote, with Ray's SSH options (``ssh`` takes the first value of an option, so ours come
    first)."""
    from algorithms.ray_compat import ssh_options

    ours = ["-o", "ControlMaster=no", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    ports = [x for local, remote in forwards for x in ("-L", f"127.0.0.1:{local}:127.0.0.1:{remote}")]
    return ["ssh", "-N", *ports, *ours,
            *ssh_options(head.ssh_key, connect_timeout, ProxyCommand=head.proxy_command), head.target]
