"""Spec loading and validation: every marker, every extension point, every error path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from algorithms import registry as R
from algorithms.diagnostics import registry as D
from orchestration import search as S
from orchestration.spec import SpecError, load_spec

BASE = {"name": "t", "algorithm": "PPO", "env": "CartPole-v1"}


def spec(**kw):
    return load_spec({**BASE, **kw})


def error(data, overrides=()) -> SpecError:
    with pytest.raises(SpecError) as e:
        load_spec(data, overrides)
    return e.value


# ---- markers -----------------------------------------------------------------------------------
def test_every_marker_becomes_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = {
        "a": {"grid": [1, 2]},
        "b": {"choice": ["x", "y"]},
        "c": {"uniform": [0.0, 1.0]},
        "d": {"loguniform": [1e-4, 1e-2]},
        "e": {"randint": [1, 5]},
        "nested": {"f": {"grid": [[64], [128, 128]]}, "plain": 3},
    }
    t = S.to_tune(cfg)
    assert t["a"] == {"grid_search": [1, 2]}
    assert isinstance(t["b"], Categorical) and t["b"].categories == ["x", "y"]
    assert isinstance(t["c"], Float) and (t["c"].lower, t["c"].upper) == (0.0, 1.0)
    assert isinstance(t["d"], Float) and "LogUniform" in type(t["d"].sampler).__name__
    assert isinstance(t["e"], Integer) and (t["e"].lower, t["e"].upper) == (1, 5)
    assert t["nested"] == {"f": {"grid_search": [[64], [128, 128]]}, "plain": 3}


def test_grid_variants_cross_product_and_representative():
    cfg = {"a": {"grid": [1, 2]}, "n": {"b": {"grid": ["x", "y", "z"]}}, "c": {"uniform": [0.5, 1.0]}}
    variants = S.grid_variants(cfg)
    assert len(variants) == 6
    assert {(v["a"], v["n"]["b"]) for _, v in variants} == {(a, b) for a in (1, 2) for b in "xyz"}
    assert all(v["c"] == {"uniform": [0.5, 1.0]} for _, v in variants)
    assert S.representative(cfg) == {"a": 1, "n": {"b": "x"}, "c": 0.5}


@pytest.mark.parametrize(
    "marker,message",
    [
        ({"grid": []}, "non-empty list"),
        ({"choice": 3}, "non-empty list"),
        ({"uniform": [1.0]}, "two numbers"),
        ({"uniform": [2.0, 1.0]}, "low < high"),
        ({"loguniform": [0.0, 1.0]}, "0 < low"),
        ({"randint": [0.5, 3]}, "two integers"),
        ({"grid": [{"grid": [1]}]}, "nested"),
    ],
)
def test_bad_marker_errors_name_the_key(marker, message):
    e = error({**BASE, "config": {"lr": marker}})
    assert e.key.startswith(f"config.lr.{next(iter(marker))}")
    assert message in str(e)


# ---- schema errors -----------------------------------------------------------------------------
def test_unknown_top_level_key_lists_close_match_and_allowed(tmp_path: Path):
    f = tmp_path / "x.yaml"
    f.write_text("name: t\nalgorithm: PPO\nenv: CartPole-v1\nseed: [1]\n")
    e = error(str(f))
    assert e.file == str(f) and e.key == "seed"
    assert "did you mean seeds" in str(e) and "allowed:" in str(e)


def test_nested_schema_error_path_and_allowed_values():
    e = error({**BASE, "scheduler": {"type": "hyperband"}})
    assert e.key == "scheduler.type" and "asha" in str(e) and "'hyperband'" in str(e)
    e = error({**BASE, "checkpoint": {"frequncy": 3}})
    assert e.key == "checkpoint.frequncy" and "did you mean frequency" in str(e)
    e = error({**BASE, "seeds": []})
    assert e.key == "seeds"


def test_yaml_and_file_errors(tmp_path: Path):
    assert "not found" in str(error(str(tmp_path / "missing.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    # FILE:LINE:COLUMN (1-based) of where PyYAML stopped, then its problem
    assert str(error(str(bad))).startswith(f"{bad}:2:1: expected ',' or ']'")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert "mapping" in str(error(str(lst)))


def test_missing_workload_and_env():
    assert error({"name": "t"}).key == "algorithm"
    assert error({"name": "t", "algorithm": "PPO"}).key == "env"
    assert error({"name": "t", "task": "regression_demo", "env": "CartPole-v1"}).key == "env"


def test_schedulers_and_searchers_need_metric():
    assert error({**BASE, "scheduler": {"type": "asha"}}).key == "metric"
    assert error({**BASE, "search": {"type": "optuna"}}).key == "metric"
    e = error({**BASE, "metric": "env/episode_return_mean", "search": {"type": "optuna"},
               "config": {"lr": {"grid": [1e-3, 1e-4]}}})
    assert e.key == "config.lr.grid" and "choice" in str(e)
    e = error({**BASE, "metric": "m", "scheduler": {"type": "pbt"}})
    assert e.key == "scheduler.mutations"


# ---- names -------------------------------------------------------------------------------------
def test_unknown_algorithm_env_and_config_key():
    e = error({**BASE, "algorithm": "PPPO"})
    assert e.key == "algorithm" and "did you mean PPO" in str(e)
    e = error({**BASE, "env": "CartPole-v9"})
    assert e.key == "env" and "CartPole-v1" in str(e)
    e = error({**BASE, "config": {"learning_rate": 1e-3}})
    assert e.key == "config.learning_rate" and "unknown key for PPO" in str(e)
    e = error({**BASE, "config": {"num_epoch": 3}})
    assert "did you mean num_epochs" in str(e)
    assert error({**BASE, "config": {"seed": 3}}).key == "config.seed"


def test_project_algorithm_values_checked_per_grid_value_before_launch():
    """WPO/EVE run their own AlgorithmConfig.validate() on each grid variant at load time."""
    wpo = {"name": "t", "algorithm": "WPO", "env": "dmc/cartpole-swingup"}
    assert load_spec({**wpo, "config": {"num_action_samples": {"grid": [5, 20]}}}).config
    e = error({**wpo, "config": {"num_action_samples": {"grid": [5, 0]}}})
    assert e.key == "config.num_action_samples"
    assert "got 0; allowed: an int >= 1" in str(e) and "num_action_samples=0" in str(e)
    e = error({"name": "t", "algorithm": "EVE", "env": "bsuite/deep_sea-0"}, ["config.q_heads=bogus"])
    assert e.key == "config.q_heads" and "allowed: shared, per_action" in str(e)
    e = error({**wpo, "config": {"lr": "abc"}})  # RLlib's own check, named by the backticked key
    assert e.key == "config.lr" and "Invalid `lr`" in str(e)


def test_rllib_keys_of_all_builder_methods_are_accepted():
    s = spec(config={"lr": 1e-3, "train_batch_size_per_learner": 500, "num_env_runners": 0,
                     "clip_param": 0.2, "evaluation_interval": 2, "model_config": {"fcnet_hiddens": [32]}})
    assert s.config["clip_param"] == 0.2


def test_task_config_checked_against_task_schema():
    s = load_spec({"name": "t", "task": "regression_demo", "config": {"lr": {"grid": [0.1, 0.01]}}})
    assert s.is_task and s.workload == "regression_demo"
    e = error({"name": "t", "task": "regression_demo", "config": {"lrr": 0.1}})
    assert e.key == "config.lrr" and "did you mean lr" in str(e)
    e = error({"name": "t", "task": "regression_demo", "config": {"lr": {"grid": [0.1, -1.0]}}})
    assert e.key == "config.lr" and "lr=-1.0" in str(e)
    e = error({"name": "t", "task": "no_such_task"})
    assert e.key == "task" and "regression_demo" in str(e)
    # A registered task named as the algorithm works too.
    assert load_spec({"name": "t", "algorithm": "regression_demo"}).is_task


class _ToyBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 8


def test_config_block_extension_point():
    R.register_config_block("toy_block", _ToyBlock, lambda cfg, block: None)
    s = spec(config={"toy_block": {"width": {"grid": [4, 8]}}})
    assert s.config["toy_block"]["width"] == {"grid": [4, 8]}
    e = error({**BASE, "config": {"toy_block": {"widht": 3}}})
    assert e.key == "config.toy_block.widht" and "did you mean width" in str(e)


class _DiagSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = 1


def test_diagnostics_registry_extension_point():
    D.register_diagnostic("toy_diag", _DiagSettings, task_hook=lambda s: None)
    s = load_spec({"name": "t", "task": "regression_demo", "diagnostics": {"toy_diag": {"every": 2}}})
    assert s.diagnostics == {"toy_diag": {"every": 2}}
    e = error({"name": "t", "task": "regression_demo", "diagnostics": {"toy_dag": {}}})
    assert e.key == "diagnostics.toy_dag" and "did you mean toy_diag" in str(e) and "toy_diag" in str(e.allowed)
    e = error({"name": "t", "task": "regression_demo", "diagnostics": {"toy_diag": {"evry": 2}}})
    assert e.key == "diagnostics.toy_diag.evry"
    e = error({**BASE, "diagnostics": {"toy_diag": None}})
    assert "does not support RLlib" in str(e)


def test_imports_are_imported_and_errors_name_the_entry(tmp_path: Path, monkeypatch):
    pkg = tmp_path / "userpkg_spec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from algorithms.registry import register_task
        register_task("user_task_from_import", "algorithms.tasks.demo:RegressionDemo")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    s = load_spec({"name": "t", "task": "user_task_from_import", "imports": ["userpkg_spec"]})
    assert s.workload == "user_task_from_import"
    e = error({"name": "t", "task": "regression_demo", "imports": ["userpkg_spec", "no_such_module_xyz"]})
    assert e.key == "imports[1]" and "no_such_module_xyz" in str(e)


# ---- overrides ---------------------------------------------------------------------------------
def test_overrides_parse_yaml_values_and_create_paths(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text("name: t\ntask: regression_demo\nconfig: {lr: 0.1}\n")
    s = load_spec(str(f), ["config.lr=0.5", "seeds=[3, 4]", "config.dim={grid: [2, 4]}", "stop.training_iteration=7"])
    assert s.config == {"lr": 0.5, "dim": {"grid": [2, 4]}}
    assert s.seeds == [3, 4] and s.stop == {"training_iteration": 7}
    assert error(str(f), ["config.lr"]).key == "config.lr"
    assert "not a mapping" in str(error(str(f), ["config.lr.x=1"]))


def test_spec_hash_changes_with_content():
    a = load_spec({"name": "t", "task": "regression_demo"})
    b = load_spec({"name": "t", "task": "regression_demo", "config": {"lr": 0.2}})
    assert a.spec_hash() != b.spec_hash() and a.spec_hash() == load_spec({"name": "t", "task": "regression_demo"}).spec_hash()


def test_every_shipped_experiment_validates():
    root = Path(__file__).resolve().parents[1] / "experiments"
    specs = sorted(root.glob("*.yaml"))
    assert specs, "no experiments shipped"
    for path in specs:
        load_spec(str(path))


def test_misspelled_marker_is_an_error_not_a_value():
    e = error({**BASE, "config": {"lr": {"unifrm": [0.1, 0.2]}}})
    assert e.key == "config.lr.unifrm" and "did you mean uniform" in str(e)


def test_config_block_must_apply_to_the_algorithm():
    e = error({**BASE, "algorithm": "SAC", "env": "Pendulum-v1", "config": {"network": {"hidden": [32]}}})
    assert e.key == "config.network" and "cannot apply to SAC" in str(e)
    assert spec(config={"network": {"hidden": [32], "norm": "layer", "nap": True}}).config["network"]["nap"] is True


def test_read_only_config_properties_reach_rllib_through_their_private_attribute():
    """`model_config` is a read-only property of AlgorithmConfig: Tune's dict config must carry it as
    `_model_config` (what `rl_module(model_config=)` sets), or RLlib's update_from_dict fails on setattr."""
    from ray.rllib.algorithms.sac import SACConfig

    from orchestration.runner import build_param_space
    from orchestration.trainables import trainable_for_algorithm

    s = load_spec({"name": "t", "algorithm": "SAC", "env": "Pendulum-v1",
                   "config": {"model_config": {"fcnet_hiddens": [64, 64]}, "tau": 0.01}})
    space = build_param_space(s)
    assert "model_config" not in space and space["_model_config"] == {"fcnet_hiddens": [64, 64]}
    assert space["tau"] == 0.01
    cfg = SACConfig().update_from_dict({k: v for k, v in space.items() if k != "_orchestra"})
    assert cfg.model_config["fcnet_hiddens"] == [64, 64]
    # what Tune calls before the trial starts, with the same dict
    trainable_for_algorithm("SAC").default_resource_request(space)


# ---- seed packing --------------------------------------------------------------------------------
def test_pack_seeds_groups_seeds_into_trials_and_refuses_what_cannot_pack():
    from orchestration.runner import build_param_space, dry_run_text

    eve = {"name": "t", "algorithm": "EVE", "env": "bsuite/deep_sea-0", "seeds": [0, 1, 2, 3]}
    s = load_spec({**eve, "pack_seeds": 2})
    assert build_param_space(s)["seed"] == {"grid_search": [[0, 1], [2, 3]]}
    assert "2 trials = 1 grid point(s) x 2 pack(s) of 2 seeds" in dry_run_text(s)
    assert build_param_space(load_spec({**eve, "pack_seeds": 4}))["seed"] == [0, 1, 2, 3]
    assert build_param_space(load_spec(eve))["seed"] == {"grid_search": [0, 1, 2, 3]}  # default 1: unchanged
    e = error({**eve, "pack_seeds": 3})
    assert e.key == "pack_seeds" and "must divide the number of seeds (4)" in str(e) and "allowed: 1, 2, 4" in str(e)
    e = error({**BASE, "seeds": [0, 1], "pack_seeds": 2})
    assert e.key == "pack_seeds" and "PPO cannot train seeds as replicas" in str(e)
    e = error({**eve, "pack_seeds": 2, "metric": "m", "scheduler": {"type": "asha"}})
    assert e.key == "pack_seeds" and "asha scheduler" in str(e)
    e = error({**eve, "pack_seeds": 2, "metric": "m", "scheduler": {"type": "pbt", "mutations": {"lr": [1e-3]}}})
    assert e.key == "pack_seeds" and "pbt" in str(e)
    e = error({**eve, "pack_seeds": 2, "config": {"num_env_runners": 1}})
    assert e.key == "config.num_env_runners" and "pack_seeds > 1" in str(e)
    e = error({"name": "t", "task": "regression_demo", "seeds": [0, 1], "pack_seeds": 2})
    assert e.key == "pack_seeds" and "cannot train seeds as replicas" in str(e)
    assert error({**eve, "pack_seeds": 0}).key == "pack_seeds"
