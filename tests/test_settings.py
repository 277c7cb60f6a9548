"""Settings models (algorithms/settings.py, OffPolicySettings / WPOSettings / EVESettings): one default, bound
and doc per setting, the same in the AlgorithmConfig, the RLModules' fallbacks, `orchestra validate` errors
and the `orchestra validate --settings NAME` listing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from algorithms.eve.config import EVEConfig, EVESettings
from algorithms.eve.module import EVEModule
from algorithms.networks.grouped import GroupedLinear
from algorithms.offpolicy.config import OffPolicyConfig, OffPolicySettings
from algorithms.settings import SettingError, check_settings, describe_allowed
from algorithms.wpo.config import WPOConfig, WPOSettings
from algorithms.wpo.module import WPOModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(OffPolicyConfig, OffPolicySettings), (WPOConfig, WPOSettings), (EVEConfig, EVESettings)]


@pytest.mark.parametrize("config_cls,model", CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
def test_every_setting_has_a_doc_and_the_config_defaults_are_the_models(config_cls, model):
    cfg = config_cls()
    assert cfg.SETTINGS is model
    for name, field in model.model_fields.items():
        assert field.description and field.description.strip(), f"{model.__name__}.{name} has no doc"
        assert getattr(cfg, name) == field.default, name
    assert check_settings(model, {k: getattr(cfg, k) for k in model.model_fields}) is not None


def test_subclasses_change_only_the_defaults_they_name():
    """WPO and EVE re-declare a core field only for its default: bounds and doc stay the core's."""
    core = OffPolicySettings.model_fields
    for model, changed in ((WPOSettings, {"samples_per_insert": 32.0, "lr": 1e-4, "n_step": 5}),
                           (EVESettings, {"samples_per_insert": 16.0, "lr": 1e-3, "train_batch_size_per_learner": 32,
                                          "grad_clip": None, "replay_capacity": 100_000, "learning_starts": 100,
                                          "target_update_period": 50, "rollout_fragment_length": 1})):
        for name, field in core.items():
            sub = model.model_fields[name]
            assert (sub.description, sub.metadata) == (field.description, field.metadata), (model.__name__, name)
            assert sub.default == changed.get(name, field.default), (model.__name__, name)


def test_training_accepts_exactly_the_models_fields_and_rllibs():
    cfg = WPOConfig().training(num_action_samples=7, lr=5e-4, rollout_fragment_length=8, gamma=0.9)
    assert (cfg.num_action_samples, cfg.lr, cfg.rollout_fragment_length, cfg.gamma) == (7, 5e-4, 8, 0.9)
    cfg = WPOConfig().training(model={"fcnet_hiddens": [8]})  # RLlib's own training() keyword still reaches it
    assert cfg.model["fcnet_hiddens"] == [8]
    with pytest.raises(TypeError, match="noise_var"):  # an EVE setting is not a WPO keyword
        WPOConfig().training(noise_var=0.1)


def test_errors_name_the_key_value_and_allowed_values_in_words():
    cases = [
        (WPOConfig, {"policy_bound": "bogus"}, "policy_bound: got 'bogus'; allowed: none, tanh_mean, tanh_squash"),
        (WPOConfig, {"num_action_samples": 2.0}, "num_action_samples: got 2.0; allowed: an int >= 1"),
        (WPOConfig, {"policy_hidden": [64, 0]}, "policy_hidden: got [64, 0]; allowed: a non-empty list of ints >= 1"),
        (WPOConfig, {"critic_lr": 0.0}, "critic_lr: got 0.0; allowed: None or a number > 0"),
        (WPOConfig, {"target_update_tau": 0}, "target_update_tau: got 0; allowed: a number in (0, 1]"),
        (EVEConfig, {"fisher_decay": 1.0}, "fisher_decay: got 1.0; allowed: a number in [0, 1)"),
        (EVEConfig, {"noise_var": -1.0}, "noise_var: got -1.0; allowed: a number > 0"),
        (EVEConfig, {"double_q": "yes"}, "double_q: got 'yes'; allowed: true, false"),
        (EVEConfig, {"replica_seeds": [1, 1]}, "replica_seeds: got [1, 1]; allowed: None or a list of distinct int seeds"),
    ]
    for config_cls, bad, message in cases:
        cfg = config_cls().training(**bad)
        with pytest.raises(SettingError) as e:
            cfg.validate()
        assert str(e.value) == message
        assert e.value.key == next(iter(bad))
    # tuples stay accepted for widths, as before the settings models
    WPOConfig().environment("Pendulum-v1").training(policy_hidden=(8, 8)).validate()


def test_describe_allowed_reads_types_and_constraints():
    from typing import Annotated, Literal

    from pydantic import Field

    assert describe_allowed(Annotated[int, Field(ge=0, le=1)]) == "an int in [0, 1]"
    assert describe_allowed(Annotated[float, Field(lt=2)]) == "a number < 2"
    assert describe_allowed(Literal["a", "b"] | None) == "None or a, b"
    assert describe_allowed(list[Annotated[float, Field(gt=0)]]) == "a list of numbers > 0"


def _same_architecture(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert [(k, tuple(v.shape)) for k, v in a.state_dict().items()] == [(k, tuple(v.shape)) for k, v in b.state_dict().items()]
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


def test_module_fallbacks_are_the_models_defaults():
    """An RLModule built without the config's auto-includes is the one the default config builds."""
    obs, act = gym.spaces.Box(-1, 1, (5,)), gym.spaces.Discrete(3)
    auto = EVEConfig()._model_config_auto_includes
    bare = RLModuleSpec(EVEModule, obs, act, model_config={}).build()
    configured = RLModuleSpec(EVEModule, obs, act, model_config=auto).build()
    _same_architecture(bare, configured)
    kinds = {type(m).__name__ for m in bare.q.modules()}  # per_action towers, LayerNorm, ELU: EVESettings'
    assert {"GroupedNorm", "ELU"} <= kinds and "ReLU" not in kinds
    assert any(isinstance(m, GroupedLinear) for m in bare.q.modules())
    assert bare.q(torch.zeros(2, 5)).shape == (2, 3)

    box = gym.spaces.Box(-1, 1, (2,))
    auto = WPOConfig()._model_config_auto_includes
    bare = RLModuleSpec(WPOModule, obs, box, model_config={}).build()
    configured = RLModuleSpec(WPOModule, obs, box, model_config=auto).build()
    _same_architecture(bare, configured)
    assert bare.policy.init_scale == WPOSettings().init_scale and bare.policy.bound == "none"
    assert bare.log_alpha_stddev.item() == WPOSettings().init_log_alpha_stddev


def _orchestra(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and len([x for x in res.stderr.splitlines() if x.strip()]) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("algorithm,env,key,value,expect", [
    ("WPO", "Pendulum-v1", "policy_bound", '"bogus"', "config.policy_bound: got 'bogus'; allowed: none, tanh_mean, tanh_squash"),
    ("EVE", "bsuite/deep_sea-0", "noise_var", "-0.5", "config.noise_var: got -0.5; allowed: a number > 0"),
])
def test_bad_setting_in_a_yaml_spec_is_one_line_exit_2(tmp_path: Path, algorithm, env, key, value, expect):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: bad\nalgorithm: {algorithm}\nenv: {env}\nconfig:\n  {key}: {value}\n")
    line = _one_error_line(_orchestra(["validate", str(spec)], tmp_path))
    assert line == f"error: {spec}: {expect}"


def test_settings_listing_prints_each_setting_from_the_model(tmp_path: Path):
    res = _orchestra(["validate", "--settings", "EVE"], tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("EVE settings (algorithms.eve.config.EVESettings")
    header = lines[1]
    assert header.split() == ["name", "type", "default", "allowed", "doc"]
    starts = [header.index(c) for c in ("name", "type", "default", "allowed", "doc")] + [None]
    rows = {cells[0]: cells for cells in ([line[a:b].strip() for a, b in zip(starts, starts[1:])] for line in lines[2:])}
    assert list(rows) == list(EVESettings.model_fields)  # one line per setting, in the model's order
    for name, field in EVESettings.model_fields.items():
        assert rows[name][4] == field.description, name
    assert rows["q_heads"][1:4] == ["str", "'per_action'", "shared, per_action"]
    assert rows["fisher_decay"][1:4] == ["float", "0.999", "a number in [0, 1)"]
    assert rows["lr"][1:3] == ["float | list[list[float]]", "0.001"]  # EVE's default, not the core's 3e-4
    assert rows["target_noise_clip"][1:4] == ["float | None", "1.0", "None or a number > 0"]

    line = _one_error_line(_orchestra(["validate", "--settings", "WPOO"], tmp_path))
    assert "--settings 'WPOO'" in line and "did you mean WPO" in line and "allowed: EVE, WPO" in line


def test_algorithm_classes_live_beside_their_configs_and_old_checkpoint_paths_resolve():
    """RLlib checkpoints pickle the Algorithm class by path (class_and_ctor_args.pkl): new ones name
    algorithms.<algo>.config, and the path older checkpoints name still resolves to the same class."""
    import pickle

    from algorithms import registry as R
    from algorithms.eve.config import EVE
    from algorithms.wpo.config import WPO

    R.load_builtin_plugins()
    for name, cls in (("WPO", WPO), ("EVE", EVE)):
        assert R.get_algorithm_class(name) is cls and cls.get_default_config().algo_class is cls
        assert pickle.loads(pickle.dumps(cls)) is cls and cls.__module__ == f"algorithms.{name.lower()}.config"
        old = f"calgorithms.{name.lower()}.algorithm\n{name}\n.".encode()  # what a checkpoint written before the move holds
        assert pickle.loads(old) is cls
