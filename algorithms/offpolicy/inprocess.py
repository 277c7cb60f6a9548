"""The off-policy core without Ray: one env runner and one learner in this process, stepped in the
order the Algorithm's ``training_step`` uses (sample, insert, the updates due at the ratio, weight
sync). For tests and benchmarks that need the core's exact objects without actors; an RLlib
``Algorithm`` built from the same config runs the same code through Ray."""

from __future__ import annotations

from typing import Any

from ray.rllib.core import DEFAULT_MODULE_ID

from algorithms.offpolicy.ratio import updates_due


def build_runner_and_learner(cfg: Any) -> tuple[Any, Any]:
    """(env runner, learner) built from ``cfg`` (validated) in this process, module specs as the
    Algorithm builds them."""
    cfg.validate()
    runner = cfg.env_runner_cls(config=cfg)
    spec = cfg.get_multi_rl_module_spec(spaces={DEFAULT_MODULE_ID: (runner.observation_space, runner.action_space)})
    learner = cfg.get_default_learner_class()(config=cfg, module_spec=spec)
    learner.build()
    return runner, learner


def core_step(runner: Any, learner: Any, cfg: Any, num_timesteps: int) -> None:
    """One round in the core's order: sample ``num_timesteps`` env steps, insert them, run the updates
    due at ``samples_per_insert``, then sync the learner's weights (and buffers) to the runner."""
    learner.insert(runner.sample(num_timesteps=num_timesteps))
    due = updates_due(learner.replay.num_env_steps, int(cfg.train_batch_size_per_learner),
                      float(cfg.samples_per_insert), learner.num_updates, int(cfg.learning_starts))
    learner.run_updates(due, {})
    runner.set_state({"rl_module": learner.module[DEFAULT_MODULE_ID].get_state(inference_only=True)})
