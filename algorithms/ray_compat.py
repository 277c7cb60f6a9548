"""The single place for private Ray symbols.

The project pins ``ray==2.60.0`` (pyproject.toml) and uses a few names outside Ray's public API: modules
under ``_private`` / ``_internal``, underscore names (``_global_registry``, ``_TrainingResult``), a private
classmethod and private instance attributes. Each is listed in :data:`PRIVATE` with what it is used for,
and code in algorithms/ and orchestration/ (and the tests) reaches it only through the functions below,
which import on first use. A Ray upgrade that moves or removes one then fails here, with one line naming
the symbol, its use, the pinned and the installed Ray:

    orchestra needs ray==2.60.0's private API ray.tune.registry._global_registry (used for ...);
    installed ray is 2.61.0 (AttributeError: ...)

tests/test_ray_compat.py resolves every entry on the installed Ray and checks the shape the code relies on.

Two entries are private methods that our subclasses override rather than call
(:data:`PRIVATE_OVERRIDES`): if Ray renamed one, the override would silently stop being called, so the
test checks that the base class still defines it. RLModule's ``_forward*`` methods are not listed: RLlib
marks them ``@OverrideToImplementCustomLogic``, its documented way to customise a module.

This module lives in algorithms/ because algorithms/ never imports orchestration/ and both use it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

RAY_PIN = "2.60.0"


class RayPrivateAPIError(ImportError):
    """A private Ray symbol the project relies on is missing from (or changed in) the installed Ray."""


@dataclass(frozen=True)
class PrivateSymbol:
    path: str
    """``module:attribute[.attribute]``; an instance attribute is written ``module:Class().attribute``."""
    used_for: str


PRIVATE: dict[str, PrivateSymbol] = {
    "prepare_config": PrivateSymbol(
        "ray.autoscaler._private.util:prepare_config",
        "filling a cluster config's defaults as `ray up` does, in orchestration.cluster"),
    "validate_config": PrivateSymbol(
        "ray.autoscaler._private.util:validate_config",
        "checking a cluster config against Ray's schema, in orchestration.cluster"),
    "SSHOptions": PrivateSymbol(
        "ray.autoscaler._private.command_runner:SSHOptions",
        "the SSH options of `ray dashboard` / `ray attach` for `orchestra ui --cluster`'s tunnel, in "
        "orchestration.tunnel"),
    "get_head_node_ip": PrivateSymbol(
        "ray.autoscaler._private.commands:get_head_node_ip",
        "the address of a cloud cluster's head (as `ray get-head-ip`), in orchestration.tunnel"),
    "_bootstrap_config": PrivateSymbol(
        "ray.autoscaler._private.commands:_bootstrap_config",
        "a cloud cluster's SSH key as `ray up` fills it in (auth.ssh_private_key), in orchestration.tunnel"),
    "get_auth_headers_if_auth_enabled": PrivateSymbol(
        "ray._private.authentication.http_token_authentication:get_auth_headers_if_auth_enabled",
        "the token header of the dashboard reachability check, in orchestration.launch"),
    "_TrainingResult": PrivateSymbol(
        "ray.train._internal.session:_TrainingResult",
        "restoring a trial from its newest complete checkpoint when Tune's is gone, in orchestration.trainables"),
    "_TrainingRunMetadata": PrivateSymbol(
        "ray.tune.trainable.metadata:_TrainingRunMetadata",
        "reading the checkpoints Tune's saved experiment state names, in tests/test_runner.py"),
    "working_dir_excludes": PrivateSymbol(
        "ray._private.runtime_env.packaging:_get_excludes",
        "which files a job's working_dir upload leaves out (a credentials file must be one), in "
        "tests/test_cluster_config.py"),
    "_global_registry": PrivateSymbol(
        "ray.tune.registry:_global_registry",
        "looking up envs registered with ray.tune.register_env (spec checks, env runners, probe sets)"),
    "_get_dist_cls_from_action_space": PrivateSymbol(
        "ray.rllib.core.models.catalog:Catalog._get_dist_cls_from_action_space",
        "the action distribution of our PPO/DQN RLModules when the catalog gives none, in algorithms.networks.rllib"),
    "trainable_counters": PrivateSymbol(
        "ray.tune.trainable.trainable:Trainable()._iteration/_time_total/_timesteps_total/_episodes_total",
        "the counters saved with each checkpoint (orchestra_checkpoint.json), in orchestration.trainables"),
}

PRIVATE_OVERRIDES: dict[str, PrivateSymbol] = {
    "_model_config_auto_includes": PrivateSymbol(
        "ray.rllib.algorithms.algorithm_config:AlgorithmConfig._model_config_auto_includes",
        "config settings copied into model_config, overridden by OffPolicyConfig, WPOConfig and EVEConfig"),
    "_compile_iteration_results": PrivateSymbol(
        "ray.rllib.algorithms.algorithm:Algorithm._compile_iteration_results",
        "the iteration's result dict, overridden by OffPolicyAlgorithm"),
}

_TRAINABLE_COUNTERS = {"training_iteration": "_iteration", "time_total_s": "_time_total",
                       "timesteps_total": "_timesteps_total", "episodes_total": "_episodes_total"}


def installed_ray() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "not installed"


def private_api_error(path: str, used_for: str, cause: BaseException) -> RayPrivateAPIError:
    return RayPrivateAPIError(
        f"orchestra needs ray=={RAY_PIN}'s private API {path.replace(':', '.')} (used for {used_for}); "
        f"installed ray is {installed_ray()} ({type(cause).__name__}: {cause})")


def resolve(path: str, used_for: str) -> Any:
    """The object at ``path`` (``module:attribute[.attribute]``), or :class:`RayPrivateAPIError`."""
    module_name, _, attributes = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for name in attributes.split(".") if attributes else []:
            obj = getattr(obj, name)
    except (ImportError, AttributeError) as e:
        raise private_api_error(path, used_for, e) from e
    return obj


@functools.cache
def private(name: str) -> Any:
    """The entry ``name`` of :data:`PRIVATE` or :data:`PRIVATE_OVERRIDES`, resolved once per process."""
    symbol = PRIVATE.get(name) or PRIVATE_OVERRIDES[name]
    return resolve(symbol.path, symbol.used_for)


def prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's ``prepare_config``: the cluster config with the defaults `ray up` fills in."""
    return private("prepare_config")(config)


def validate_cluster_config(config: dict[str, Any]) -> None:
    """Ray's ``validate_config`` (raises ValueError / jsonschema errors)."""
    private("validate_config")(config)


def auth_headers_if_auth_enabled(headers: dict[str, str]) -> dict[str, str]:
    """Ray's ``get_auth_headers_if_auth_enabled``: ``headers`` plus this process's token header when token
    authentication is on (Ray raises when it is on and no token is found)."""
    return private("get_auth_headers_if_auth_enabled")(headers)


def ssh_options(ssh_key: str | None, connect_timeout: int, **options: str | None) -> list[str]:
    """The ssh command-line options Ray's SSH command runner uses (``-i KEY`` and ``-o K=V`` pairs, with
    ``ConnectTimeout``), without a shared control connection; ``options`` add or replace ``-o`` values
    (None leaves one out)."""
    return private("SSHOptions")(ssh_key, None, **options).to_ssh_options_list(timeout=connect_timeout)


def head_node_ip(config_file: str) -> str:
    """Ray's ``get_head_node_ip``: the running head's address by the cluster's node provider (raises
    RuntimeError when there is none)."""
    return private("get_head_node_ip")(config_file)


def bootstrap_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's ``_bootstrap_config``: the config as `ray up` completes it (cached like Ray's CLI does)."""
    return private("_bootstrap_config")(config)


def working_dir_excluded(working_dir: Any, excludes: list[str], path: Any) -> bool:
    """Whether Ray's runtime_env packaging leaves ``path`` (inside ``working_dir``) out of the upload for
    the gitignore-style ``excludes`` of a runtime_env."""
    from pathlib import Path

    return bool(private("working_dir_excludes")(Path(working_dir), list(excludes))(Path(path)))


def training_result(checkpoint: Any, metrics: dict[str, Any]) -> Any:
    """A Tune ``_TrainingResult`` (what ``Trainable.restore`` accepts besides a checkpoint)."""
    return private("_TrainingResult")(checkpoint=checkpoint, metrics=metrics)


def training_run_metadata(json_state: str) -> Any:
    """Tune's ``_TrainingRunMetadata`` of a trial, from the trial's ``runtime`` entry in the experiment state."""
    return private("_TrainingRunMetadata").from_json_state(json_state)


def registered_env_creator(name: str) -> Callable[[Any], Any] | None:
    """The creator registered with ``ray.tune.register_env(name, ...)``, or None."""
    from ray.tune.registry import ENV_CREATOR

    registry = private("_global_registry")
    return registry.get(ENV_CREATOR, name) if registry.contains(ENV_CREATOR, name) else None


def action_dist_cls(action_space: Any) -> Any:
    """RLlib's torch action distribution class for ``action_space`` (what the Catalog would pick)."""
    return private("_get_dist_cls_from_action_space")(action_space, framework="torch")


def trainable_counters(trainable: Any) -> dict[str, Any]:
    """Tune's counters of a Trainable: training_iteration, time_total_s, timesteps_total, episodes_total
    (the metrics ``Trainable.restore`` reads back from a checkpoint)."""
    symbol = PRIVATE["trainable_counters"]
    try:
        return {key: getattr(trainable, attr) for key, attr in _TRAINABLE_COUNTERS.items()}
    except AttributeError as e:
        raise private_api_error(symbol.path, symbol.used_for, e) from e
