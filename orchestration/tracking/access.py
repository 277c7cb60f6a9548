"""Access to an MLflow tracking server with authentication, checked before anything runs.

A server started by ``orchestra server`` (MLflow's basic-auth app, docs/clusters.md) answers 401 to a
request without valid credentials and 403 to a user without permission on an experiment. MLflow's
client reads its credentials itself from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
(else ``~/.mlflow/credentials``; https://mlflow.org/docs/latest/self-hosting/security/basic-http-auth/).
A spec may name a credentials file in ``tracking.credentials_file`` instead: the same INI format as
``~/.mlflow/credentials``::

    [mlflow]
    mlflow_tracking_username = alice
    mlflow_tracking_password = ...

Its values are put in the driver's environment, where the tracking callback's thread sends every
request; trials never talk to MLflow, so a local launch does not put the password in Ray's runtime_env
(which Ray keeps in its GCS). A launch on a cluster (``orchestra launch``) has its driver on the head:
there the credentials arrive as the job's runtime_env env_vars (orchestration.launch.job_credentials).

Both checks turn what would otherwise be retries, a hang or a run logged nowhere into one UserError:
:func:`check_tracking_server` (reachable; credentials accepted) for every command, and
:func:`check_experiment_write` (the experiment can be written) before a launch starts its trials.
"""

from __future__ import annotations

import base64
import configparser
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

from orchestration.spec import UserError

USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
HOW = (f"set {USERNAME_ENV} and {PASSWORD_ENV}, or name a credentials file in the spec's "
       "tracking.credentials_file (docs/clusters.md)")


def is_server_uri(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("http", "https") if "://" in uri else False


def read_credentials_file(path: str | Path) -> tuple[str, str]:
    """(username, password) from an INI file in the format of MLflow's ``~/.mlflow/credentials``.
    The file must exist, hold both keys and be readable by its owner only (like an SSH key)."""
    f = Path(path).expanduser()
    where = f"tracking.credentials_file {str(path)!r}"
    if not f.is_file():
        raise UserError(f"{where}: no such file")
    mode = f.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{where}: readable by other users (mode {stat.S_IMODE(mode):o}); run `chmod 600 {f}`")
    config = configparser.ConfigParser()
    try:
        config.read(f)
    except configparser.Error as e:
        raise UserError(f"{where}: not an INI file ({type(e).__name__})") from None
    section = config["mlflow"] if config.has_section("mlflow") else {}
    user, password = section.get(USERNAME_ENV.lower()), section.get(PASSWORD_ENV.lower())
    if not user or not password:
        raise UserError(f"{where}: needs a [mlflow] section with {USERNAME_ENV.lower()} and "
                        f"{PASSWORD_ENV.lower()}")
    return user, password


def apply_credentials_file(path: str | Path | None) -> None:
    """Put the file's credentials in this process's environment, where MLflow's client reads them (the
    spec's file is the more specific setting, so it replaces credentials already in the environment)."""
    if path:
        os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = read_credentials_file(path)


def _client_credentials() -> tuple[str | None, str | None]:
    """The username and password MLflow's client will send (environment, else ~/.mlflow/credentials)."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    return creds.username, creds.password


def check_tracking_server(url: str, where: str) -> None:
    """Fail fast, with one UserError, on a tracking server that refuses connections (MLflow itself
    retries for minutes) or the credentials the client would send (401)."""
    base = url.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=10):
            pass
    except urllib.error.HTTPError:  # it answered: reachable (a proxy's auth, no /health route)
        pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{where}: cannot reach the MLflow tracking server ({reason})") from None
    user, password = _client_credentials()
    request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=1")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as e:
        if e.code != 401:  # not our business here: MLflow's client reports it with its own message
            return
    except (OSError, ValueError):
        return
    if user and password:
        raise UserError(f"{where}: the MLflow tracking server rejected the password of user {user!r} (HTTP 401); "
                        f"check {PASSWORD_ENV} or the credentials file")
    raise UserError(f"{where}: the MLflow tracking server requires authentication (HTTP 401) and no "
                    f"credentials are set: {HOW}")


def check_experiment_write(uri: str, experiment: str, artifact_location: str | None, launch: str) -> None:
    """On a tracking server: find or create ``experiment`` and tag it with the launch, the writes a launch
    begins with, so a user who may not write to it (403) is told before any trial starts."""
    from mlflow.exceptions import MlflowException

    from orchestration.tracking.store import experiment_id, mlflow_client

    check_tracking_server(uri, f"tracking.uri {uri!r}")
    client = mlflow_client(uri)
    try:
        exp_id = experiment_id(client, experiment, artifact_location)
        client.set_experiment_tag(exp_id, "orchestra.last_launch", launch)
    except MlflowException as e:
        status = e.get_http_status_code()
        if status not in (401, 403):
            raise
        user = _client_credentials()[0]
        raise UserError(f"tracking.uri {uri!r}: user {user!r} may not write to experiment {experiment!r} "
                        f"(HTTP {status}); an admin grants EDIT with the permissions API (docs/clusters.md)"
                        ) from None
