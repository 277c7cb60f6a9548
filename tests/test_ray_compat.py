"""algorithms/ray_compat.py: every private Ray symbol resolves on the installed Ray and has the shape the code
relies on; a missing one fails with one line naming it, its use, the pinned and the installed Ray."""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gymnasium as gym
import pytest
import yaml

from algorithms import ray_compat
from algorithms.ray_compat import RAY_PIN, RayPrivateAPIError


def test_every_entry_resolves_on_the_installed_ray():
    assert metadata.version("ray") == RAY_PIN, "pyproject.toml pins the Ray this module is written for"
    for name, symbol in {**ray_compat.PRIVATE, **ray_compat.PRIVATE_OVERRIDES}.items():
        if "()" in symbol.path:  # instance attributes: checked on a live object below
            continue
        assert ray_compat.private(name) is not None, name
        assert symbol.used_for


def test_cluster_config_functions_take_and_return_a_config():
    for name in ("prepare_config", "validate_config"):
        params = list(inspect.signature(ray_compat.private(name)).parameters)
        assert params == ["config"], (name, params)
    raw = yaml.safe_load((Path(__file__).parents[1] / "cluster-local.yaml").read_text())
    prepared = ray_compat.prepare_cluster_config(copy.deepcopy(raw))
    assert isinstance(prepared, dict) and "available_node_types" not in raw and prepared["available_node_types"]
    assert ray_compat.validate_cluster_config(prepared) is None
    with pytest.raises(Exception, match="idle_timeout_minutes"):  # jsonschema's ValidationError
        ray_compat.validate_cluster_config({**prepared, "idle_timeout_minutes": "soon"})


def test_auth_headers_empty_without_token_auth_and_bearer_with_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    code = "from algorithms.ray_compat import auth_headers_if_auth_enabled as f; print(f({}))"
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    on = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "a" * 32},
                        capture_output=True, text=True, timeout=120)
    assert off.returncode == 0 and off.stdout.strip() == "{}", off.stderr[-2000:]
    assert on.returncode == 0 and on.stdout.strip() == "{'authorization': 'Bearer " + "a" * 32 + "'}", on.stderr[-2000:]


def test_ssh_options_are_rays_without_a_control_connection():
    assert list(inspect.signature(ray_compat.private("SSHOptions")).parameters) == ["ssh_key", "control_path", "kwargs"]
    opts = ray_compat.ssh_options("~/.ssh/key", 7, ProxyCommand=None)
    assert opts[:2] == ["-i", "~/.ssh/key"]
    pairs = dict(o.split("=", 1) for o in opts[3::2])
    assert opts[2::2] == ["-o"] * len(pairs)
    assert pairs["StrictHostKeyChecking"] == "no" and pairs["ExitOnForwardFailure"] == "yes"
    assert pairs["ConnectTimeout"] == "7s" and pairs["ServerAliveInterval"] == "5"
    assert not any(k.startswith("Control") or k == "ProxyCommand" for k in pairs), pairs
    assert "ProxyCommand=nc %h %p" in ray_compat.ssh_options(None, 7, ProxyCommand="nc %h %p")
    assert "-i" not in ray_compat.ssh_options(None, 7)


def test_head_lookup_functions_keep_their_shape():
    assert list(inspect.signature(ray_compat.private("get_head_node_ip")).parameters) == [
        "config_file", "override_cluster_name"]
    assert list(inspect.signature(ray_compat.private("_bootstrap_config")).parameters) == ["config", "no_config_cache"]
    raw = yaml.safe_load((Path(__file__).parents[1] / "cluster-local.yaml").read_text())
    booted = ray_compat.bootstrap_cluster_config(copy.deepcopy(raw))
    assert booted["auth"] == raw["auth"] and booted["available_node_types"]  # what `ray up` completes


def test_working_dir_excludes_follow_gitignore_patterns(tmp_path: Path):
    params = list(inspect.signature(ray_compat.private("working_dir_excludes")).parameters)
    assert params == ["path", "excludes"]
    (tmp_path / "secrets").mkdir()
    (tmp_path / "sub" / "secrets").mkdir(parents=True)
    excludes = ["/secrets/mlflow.ini", ".venv"]
    assert ray_compat.working_dir_excluded(tmp_path, excludes, tmp_path / "secrets" / "mlflow.ini")
    assert ray_compat.working_dir_excluded(tmp_path, excludes, tmp_path / "sub" / ".venv")
    assert not ray_compat.working_dir_excluded(tmp_path, excludes, tmp_path / "sub" / "secrets" / "mlflow.ini")
    assert not ray_compat.working_dir_excluded(tmp_path, excludes, tmp_path / "secrets" / "other.ini")


def test_training_result_holds_checkpoint_and_metrics():
    from ray import tune

    ckpt = tune.Checkpoint("/tmp/ray_compat_checkpoint")
    result = ray_compat.training_result(ckpt, {"training_iteration": 3})
    assert result.checkpoint is ckpt and result.metrics == {"training_iteration": 3}


def test_training_run_metadata_reads_a_trials_saved_state():
    from ray.tune.experiment import Trial

    trial = Trial("ray_compat_trainable", stub=True)
    restored = ray_compat.training_run_metadata(trial.run_metadata.get_json_state())
    assert restored.checkpoint_manager.latest_checkpoint_result is None  # no checkpoint yet


def test_registered_env_creator_finds_register_env_and_none_otherwise():
    from ray import tune

    tune.register_env("ray_compat_env", lambda ctx: ("made", dict(ctx)))
    creator = ray_compat.registered_env_creator("ray_compat_env")
    assert creator is not None and creator({"a": 1}) == ("made", {"a": 1})
    assert ray_compat.registered_env_creator("ray_compat_env_never_registered") is None


@pytest.mark.parametrize(("space", "dim"), [(gym.spaces.Discrete(3), 3), (gym.spaces.Box(-1, 1, (2,)), 4)])
def test_action_dist_cls_gives_rllibs_torch_distribution(space, dim):
    from ray.rllib.core.distribution.torch.torch_distribution import TorchDistribution

    cls = ray_compat.action_dist_cls(space)
    assert issubclass(cls, TorchDistribution)
    assert cls.required_input_dim(space=space, model_config={}) == dim  # logits; Gaussian mean and log std


def test_trainable_counters_follow_a_real_trainable():
    from ray import tune

    class Counting(tune.Trainable):
        def step(self):
            return {"timesteps_this_iter": 7, "episodes_this_iter": 1}

    trainable = Counting(config={})
    try:
        assert ray_compat.trainable_counters(trainable) == {"training_iteration": 0, "time_total_s": 0.0,
                                                            "timesteps_total": None, "episodes_total": None}
        trainable.train()
        trainable.train()
        counters = ray_compat.trainable_counters(trainable)
    finally:
        trainable.stop()
    assert counters["training_iteration"] == 2 == trainable.iteration
    assert counters["timesteps_total"] == 14 and counters["episodes_total"] == 2 and counters["time_total_s"] > 0


def test_overridden_private_hooks_are_still_called_by_ray():
    """A renamed hook would leave our override uncalled: Ray's callers still reference them, and the configs'
    additions reach model_config."""
    from ray.rllib.algorithms.algorithm import Algorithm
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig

    from algorithms.wpo.config import WPOConfig

    assert isinstance(ray_compat.private("_model_config_auto_includes"), property)
    assert "_model_config_auto_includes" in AlgorithmConfig.model_config.fget.__code__.co_names
    config = WPOConfig()
    assert config.model_config["policy_hidden"] == list(config.policy_hidden)

    compile_results = ray_compat.private("_compile_iteration_results")
    # Ray's tracing hook adds `_ray_trace_ctx` to the methods of a class once it has run as an actor in this process
    params = [p for p in inspect.signature(compile_results).parameters if p != "_ray_trace_ctx"]
    assert params == ["self", "train_results", "eval_results"]
    assert "_compile_iteration_results" in Algorithm.step.__code__.co_names


def test_a_missing_module_fails_with_one_clear_line():
    with pytest.raises(RayPrivateAPIError) as e:
        ray_compat.resolve("ray.autoscaler._private.no_such_module:prepare_config", "validating cluster configs")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"orchestra needs ray=={RAY_PIN}'s private API "
                          "ray.autoscaler._private.no_such_module.prepare_config (used for validating cluster configs); "
                          f"installed ray is {metadata.version('ray')} (ModuleNotFoundError: ")
    assert isinstance(e.value, ImportError)


def test_a_missing_attribute_fails_with_one_clear_line():
    with pytest.raises(RayPrivateAPIError, match=r"private API ray\.tune\.registry\._no_such_registry \(used for a "
                                                 r"lookup\); installed ray is .* \(AttributeError: "):
        ray_compat.resolve("ray.tune.registry:_no_such_registry", "a lookup")
    with pytest.raises(RayPrivateAPIError, match=r"Trainable\(\)\._iteration.*AttributeError"):
        ray_compat.trainable_counters(object())
