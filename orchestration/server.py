"""`orchestra server`: one MLflow tracking server for a team, with authentication on.

It runs ``mlflow server --app-name basic-auth`` (MLflow's basic-auth app: users, per-experiment
permissions; https://mlflow.org/docs/latest/self-hosting/security/basic-http-auth/) with

- a server folder (``--root``, default ``mlflow-server/``) holding the run store ``mlflow.db``, the
  user store ``auth.db``, the auth config ``auth.ini`` and the artifacts;
- artifacts proxied through the server (``--serve-artifacts --artifacts-destination ROOT/artifacts``),
  so clients and trials need the server's credentials only, never storage credentials;
- ``--allowed-hosts`` (Host headers: DNS rebinding) and ``--cors-allowed-origins`` (browser origins)
  set to this server's own address unless given;
- 127.0.0.1 unless ``--host`` says otherwise.

The admin user is created on the first start, from ``--admin-password-file`` or
``$MLFLOW_AUTH_ADMIN_PASSWORD``; there is no default password. The password reaches MLflow in its
environment (``MLFLOW_AUTH_ADMIN_PASSWORD``, which ``mlflow.server.auth.config.read_auth_config``
prefers over the ini's ``admin_password``), so it is never written into ``auth.ini``. MLflow ignores
it once the admin exists.

New users get ``NO_PERMISSIONS`` by default (``--default-permission``): a new account sees and changes
only the experiments it creates (their creator gets MANAGE) until an admin grants it more. READ, MLflow's
own default, would show every account every team member's runs, params and artifacts (specs, paths,
pip freezes); a lab decides per experiment instead.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestration.spec import UserError

PERMISSIONS = ("NO_PERMISSIONS", "READ", "EDIT", "MANAGE")
DEFAULT_PERMISSION = "NO_PERMISSIONS"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_EXTRA_HINT = "pip install 'mlflow[auth]'"


@dataclass
class ServerConfig:
    root: Path
    host: str = "127.0.0.1"
    port: int = 5000
    admin_username: str = "admin"
    admin_password_file: str | None = None
    default_permission: str = DEFAULT_PERMISSION
    allowed_hosts: str | None = None
    cors_allowed_origins: str | None = None
    workers: int = 1

    @property
    def url(self) -> str:
        host = "HOST" if _is_wildcard(self.host) else self.host  # a wildcard bind: clients use the host's name
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(cfg: ServerConfig) -> str:
    """Host headers the server accepts: the given list, else its own address (and localhost on loopback)."""
    if cfg.allowed_hosts:
        return cfg.allowed_hosts
    if _is_wildcard(cfg.host):
        raise UserError(f"--host {cfg.host}: listening on every interface needs --allowed-hosts naming the "
                        "name(s) clients use, e.g. --allowed-hosts mlflow.lab.example:5000")
    hosts = [f"{cfg.host}:{cfg.port}"]
    if _is_loopback(cfg.host):
        hosts += [f"127.0.0.1:{cfg.port}", f"localhost:{cfg.port}"]
    return ",".join(dict.fromkeys(hosts))


def cors_origins(cfg: ServerConfig) -> str:
    """Browser origins allowed to call the API: the given list, else the server's own UI origins."""
    if cfg.cors_allowed_origins:
        return cfg.cors_allowed_origins
    return ",".join(f"http://{h}" for h in allowed_hosts(cfg).split(","))


def admin_password(cfg: ServerConfig, first_start: bool) -> str | None:
    """The admin's password from --admin-password-file, else $MLFLOW_AUTH_ADMIN_PASSWORD; required on the
    first start (no user store yet), when MLflow creates the admin with it."""
    if cfg.admin_password_file:
        f = Path(cfg.admin_password_file).expanduser()
        if not f.is_file():
            raise UserError(f"--admin-password-file {cfg.admin_password_file}: no such file")
        password = f.read_text().strip()
        if not password:
            raise UserError(f"--admin-password-file {cfg.admin_password_file}: the file is empty")
        return password
    password = os.environ.get(ADMIN_PASSWORD_ENV) or None
    if first_start and not password:
        raise UserError(f"the first start creates the admin user {cfg.admin_username!r} and needs its password: "
                        f"--admin-password-file FILE or ${ADMIN_PASSWORD_ENV} (there is no default password)")
    return password


def _secret_key(root: Path) -> str:
    """The Flask secret key of MLflow's auth app (CSRF of its sign-up form), kept in ROOT/secret_key so
    every worker and every restart share it; $MLFLOW_FLASK_SERVER_SECRET_KEY wins when set."""
    if os.environ.get(SECRET_KEY_ENV):
        return os.environ[SECRET_KEY_ENV]
    f = root / "secret_key"
    if not f.exists():
        f.touch(mode=0o600)
        f.write_text(secrets.token_hex(32))
    return f.read_text().strip()


def write_auth_config(cfg: ServerConfig) -> Path:
    """ROOT/auth.ini, the file MLflow's auth app reads from $MLFLOW_AUTH_CONFIG_PATH (format:
    mlflow/server/auth/basic_auth.ini); without the admin password, which goes in the environment."""
    path = cfg.root / "auth.ini"
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {cfg.default_permission}\n"
        f"database_uri = sqlite:///{(cfg.root / 'auth.db').resolve()}\n"
        f"admin_username = {cfg.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )
    path.chmod(0o600)
    return path


def server_command(cfg: ServerConfig) -> list[str]:
    root = cfg.root.resolve()
    return [
        sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
        "--host", cfg.host, "--port", str(cfg.port), "--workers", str(cfg.workers),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
        "--allowed-hosts", allowed_hosts(cfg), "--cors-allowed-origins", cors_origins(cfg),
    ]


def server_env(cfg: ServerConfig) -> dict[str, str]:
    """The server's environment: ours plus the auth config, secret key and (first start) admin password."""
    first_start = not (cfg.root / "auth.db").exists()
    password = admin_password(cfg, first_start)
    env = dict(os.environ)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(cfg).resolve())
    env[SECRET_KEY_ENV] = _secret_key(cfg.root)
    env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)  # auth.ini names the admin
    if password:
        env[ADMIN_PASSWORD_ENV] = password
    else:
        env.pop(ADMIN_PASSWORD_ENV, None)
    return env


def check_config(cfg: ServerConfig) -> None:
    if importlib.util.find_spec("flask_wtf") is None:
        raise UserError(f"`orchestra server` runs MLflow's basic-auth app, which needs Flask-WTF (MLflow's "
                        f"auth extra): install it with `{AUTH_EXTRA_HINT}`")
    if cfg.default_permission not in PERMISSIONS:
        raise UserError(f"--default-permission {cfg.default_permission}: allowed: {', '.join(PERMISSIONS)}")
    if not 0 < cfg.port < 65536:
        raise UserError(f"--port {cfg.port}: allowed: 1..65535")
    if cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers}: allowed: 1 or more")
    if not cfg.admin_username.strip():
        raise UserError("--admin-username: must not be empty")


def client_instructions(cfg: ServerConfig) -> str:
    url = cfg.url
    return "\n".join([
        f"MLflow tracking server with authentication at {url} (store {cfg.root.resolve()}; Ctrl-C to stop)",
        f"admin user: {cfg.admin_username}; new users get {cfg.default_permission} on experiments they did not create",
        "clients authenticate with MLflow's variables (or a spec's tracking.credentials_file):",
        f"  export MLFLOW_TRACKING_URI={url}",
        "  export MLFLOW_TRACKING_USERNAME=<user>",
        "  export MLFLOW_TRACKING_PASSWORD=<password>",
        "users and permissions: docs/clusters.md (\"A shared tracking server\")",
    ])


def serve(cfg: ServerConfig) -> int:
    """Run the server until it exits or we get SIGTERM/SIGINT (then stop it and its workers)."""
    from orchestration.ui import run_until_signalled

    check_config(cfg)
    cfg.root.mkdir(parents=True, exist_ok=True)
    (cfg.root / "artifacts").mkdir(exist_ok=True)
    cmd, env = server_command(cfg), server_env(cfg)
    print(client_instructions(cfg), flush=True)
    return run_until_signalled(cmd, env=env, stop_timeout=60)
