"""The off-policy core in real RLlib runs (WPO as the algorithm on it, tiny networks, Pendulum-v1):
samples-per-insert bookkeeping, bit-identical continuation after save/restore on CPU, the replay in or
out of checkpoints, remote env runners, target updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.offpolicy.ratio import updates_due


def tiny(seed: int = 0, **training):
    from algorithms.wpo.config import WPOConfig

    settings = dict(policy_hidden=[16], critic_hidden=[16], num_action_samples=2, num_target_action_samples=2,
                    train_batch_size_per_learner=32, learning_starts=100, samples_per_insert=16.0, n_step=3,
                    target_update_period=10, max_updates_per_call=7)
    settings.update(training)
    cfg = WPOConfig().environment("Pendulum-v1").training(**settings).debugging(seed=seed)
    cfg.min_sample_timesteps_per_iteration = 150
    cfg.rollout_fragment_length = 50
    return cfg


def learner_of(algo):
    return algo.learner_group._learner


def weights(algo) -> dict[str, np.ndarray]:
    module = learner_of(algo).module["default_policy"]
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def scalars(result: dict) -> dict[str, float]:
    out = {f"learner/{k}": v for k, v in result["learners"]["default_policy"].items() if isinstance(v, float | int)}
    env = result["env_runners"]
    for k in ("episode_return_mean", "num_env_steps_sampled_lifetime", "num_episodes_lifetime"):
        if k in env:
            out[f"env/{k}"] = env[k]
    return out


def test_samples_per_insert_bookkeeping_in_a_real_run(ray_local):
    torch.set_num_threads(1)
    algo = tiny(max_updates_per_call=3).build_algo()
    try:
        for _ in range(3):
            result = algo.train()
        steps = result["num_env_steps_sampled_lifetime"]
        assert steps == 450  # 3 iterations x 3 chunks of 50 steps
        expected = updates_due(steps, 32, 16.0, 0, 100)  # floor((450 - 100) * 16 / 32) = 175
        assert expected == 175
        assert learner_of(algo).num_updates == algo.updates_done == expected
        assert result["learners"]["default_policy"]["num_updates_lifetime"] == expected
        spi = result["system"]["samples_per_insert"]
        assert 16.0 - 32 / 350 < spi <= 16.0
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 450
        # 175 updates with hard target copies every 10: the target equals the online policy as of update 170
        module = learner_of(algo).module["default_policy"].unwrapped()
        assert not torch.equal(next(module.policy.parameters()), next(module.target_policy.parameters()))
        assert all(not p.requires_grad for p in module.target_critic.parameters())
        # the local runner's module got the learner's weights after the last updates (direct tensor copy)
        runner_state = algo.env_runner.module.state_dict()
        learner_state = module.state_dict()
        assert runner_state and all(torch.equal(t, learner_state[k]) for k, t in runner_state.items())
        assert algo._sync_plan[2] is not None and len(algo._sync_plan[2]) == len(runner_state)
    finally:
        algo.stop()


def test_target_update_period_and_polyak(ray_local):
    torch.set_num_threads(1)
    # updates run in calls of 5 (max_updates_per_call) and targets are copied every 5 updates: after
    # each call the target equals the online networks exactly
    algo = tiny(max_updates_per_call=5, target_update_period=5, samples_per_insert=32.0).build_algo()
    try:
        algo.train()
        module = learner_of(algo).module["default_policy"].unwrapped()
        assert algo.updates_done % 5 == 0 and algo.updates_done > 0
        for online, target in module.get_target_network_pairs():
            for p, t in zip(online.parameters(), target.parameters()):
                assert torch.equal(p, t)
    finally:
        algo.stop()


def _continue_and_compare(cfg, tmp_path: Path, k: int = 2, more: int = 2):
    from ray.rllib.algorithms.algorithm import Algorithm

    algo = cfg.build_algo()
    try:
        for _ in range(k):
            algo.train()
        path = algo.save(str(tmp_path / "ckpt")).checkpoint.path
        uninterrupted = [scalars(algo.train()) for _ in range(more)]
        final = weights(algo)
    finally:
        algo.stop()
    restored = Algorithm.from_checkpoint(path)
    try:
        resumed = [scalars(restored.train()) for _ in range(more)]
        assert resumed == uninterrupted
        after = weights(restored)
        assert after.keys() == final.keys()
        for key in final:
            np.testing.assert_array_equal(after[key], final[key], err_msg=key)
        return restored, path
    finally:
        restored.stop()


def test_save_restore_continues_bit_identically_with_replay(ray_local, tmp_path: Path):
    torch.set_num_threads(1)
    _continue_and_compare(tiny(checkpoint_replay=True), tmp_path)


def test_replay_excluded_from_checkpoint_unless_asked(ray_local, tmp_path: Path):
    from ray.rllib.algorithms.algorithm import Algorithm

    torch.set_num_threads(1)
    largest_file: dict[bool, int] = {}
    for with_replay in (False, True):
        algo = tiny(checkpoint_replay=with_replay).build_algo()
        try:
            algo.train()
            size = len(learner_of(algo).replay)
            stored = {k: v.clone() for k, v in learner_of(algo).replay.stored().items()}
            path = algo.save(str(tmp_path / f"ckpt_{with_replay}")).checkpoint.path
        finally:
            algo.stop()
        largest_file[with_replay] = max(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        restored = Algorithm.from_checkpoint(path)
        try:
            replay = learner_of(restored).replay
            if with_replay:
                assert len(replay) == size > 0
                for k, v in replay.stored().items():
                    assert torch.equal(v, stored[k]), k
            else:
                assert len(replay) == 0
            assert restored.env_steps_inserted == 150 and restored.updates_done == updates_due(150, 32, 16.0, 0, 100)
            result = restored.train()  # training continues (on an empty replay without it)
            assert result["num_env_steps_sampled_lifetime"] == 300
        finally:
            restored.stop()
    assert largest_file[True] > largest_file[False]  # the learner state holds the replay only when asked


@pytest.mark.slow
def test_save_restore_bit_identical_with_remote_env_runners(ray_local, tmp_path: Path):
    torch.set_num_threads(1)
    cfg = tiny(checkpoint_replay=True)
    cfg.env_runners(num_env_runners=1, num_envs_per_env_runner=2)
    _continue_and_compare(cfg, tmp_path, k=1, more=1)


def test_adam_helper_fuses_where_allowed_and_updates_like_plain_adam():
    """offpolicy.learner.adam: fused for float32 on CPU (same steps as torch's default Adam to float
    precision), torch's default for dtypes the fused CPU kernel does not take."""
    from algorithms.offpolicy.learner import adam

    torch.manual_seed(0)
    start = torch.randn(5, 3)
    fused_p, plain_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    fused, plain = adam([fused_p], lr=0.01), torch.optim.Adam([plain_p], lr=0.01)
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    for _ in range(5):
        grad = torch.randn(5, 3)
        fused_p.grad, plain_p.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(fused_p.detach(), plain_p.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_p.detach(), start)
    assert not adam([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]).defaults.get("fused")


def test_runner_sample_counters_are_exact_at_every_read():
    """The env runner's counters (num_env_steps_sampled, num_episodes and their lifetime sums) report the env steps
    and episodes sampled since the previous read, whether read by get_metrics, carried by get_state into another
    runner, or read after a restore (they are logged summed when read: VectorEnvRunner._log_steps)."""
    from algorithms.offpolicy.inprocess import build_runner_and_learner

    def counts(metrics: dict) -> tuple:
        keys = ("num_env_steps_sampled", "num_episodes", "num_env_steps_sampled_lifetime", "num_episodes_lifetime")
        return tuple(int(metrics[k].peek() if hasattr(metrics[k], "peek") else metrics[k]) for k in keys)

    runner, _ = build_runner_and_learner(tiny())  # Pendulum-v1: 200-step episodes, fragments of 50 steps
    for _ in range(5):
        runner.sample()
    assert counts(runner.get_metrics()) == (250, 1, 250, 1)
    for _ in range(3):
        runner.sample()
    state = runner.get_state()  # 150 steps and the second episode's end not yet read
    restored, _ = build_runner_and_learner(tiny())
    restored.set_state(state)
    assert counts(restored.get_metrics()) == (150, 1, 150, 1)
    runner.sample()
    assert counts(runner.get_metrics()) == (200, 1, 200, 1)
    restored.sample()
    assert counts(restored.get_metrics()) == (50, 0, 50, 0)
