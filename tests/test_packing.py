"""Seed packing (algorithms/offpolicy/packing.py): per-replica clipping by hand, the stacked optimiser is K
independent ones, and the property that makes packing safe: replica s of a pack and an unpacked learner of
seed s, fed the same transitions, reach the same parameters after 100 updates (WPO and EVE)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch
from ray import cloudpickle

from algorithms.offpolicy.packing import Replica, ReplicaPack, StackedOptimizer, clip_per_replica_

# Float32 round-off: the pack sums each replica's gradient norm over a [K, n] view instead of one tensor at a
# time, so clipping scales differ in the last bits; after 100 Adam steps the parameters agree to this.
ATOL, RTOL = 1e-5, 1e-4

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Tune's workers get this module's trainable by value


def test_clip_per_replica_uses_each_replicas_own_global_norm():
    """Replica 0: g = (3, 4) and (0,) -> ‖g_0‖ = 5, clipped to norm 1; replica 1: ‖g_1‖ = 0.5 < 1, unchanged."""
    a = torch.tensor([[3.0, 4.0], [0.3, 0.0]])
    b = torch.tensor([[0.0], [0.4]])
    norms = clip_per_replica_([a, b], 1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    s = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(a, torch.tensor([[3.0 * s, 4.0 * s], [0.3, 0.0]]))
    torch.testing.assert_close(b, torch.tensor([[0.0], [0.4]]))
    # a joint norm over both replicas (sqrt(25.25)) would have scaled replica 1 too: it did not
    assert float(b[1, 0]) == pytest.approx(0.4)


def test_stacked_adam_equals_k_independent_adams():
    """One Adam over θ [K, ...] after ``StackedOptimizer`` takes the replicas' parameters as views: the same
    trajectory as each replica's own Adam (Adam is elementwise), and the replicas' Parameters see it."""
    torch.manual_seed(0)
    nets = [torch.nn.Linear(3, 2) for _ in range(2)]
    refs = [torch.nn.Linear(3, 2) for _ in range(2)]
    for n, r in zip(nets, refs):
        r.load_state_dict(n.state_dict())
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in nets]
    ref_opts = [torch.optim.Adam(r.parameters(), lr=1e-2) for r in refs]
    stacked = StackedOptimizer(opts)
    x = torch.randn(2, 5, 3)
    for _ in range(20):
        for k in range(2):
            for net, opt in ((nets[k], None), (refs[k], ref_opts[k])):
                net.zero_grad()
                net(x[k] * (k + 1)).pow(2).sum().backward()
                if opt is not None:
                    opt.step()
        stacked.gather_grads([0, 1])
        stacked.step()
    for n, r in zip(nets, refs):
        for p, q in zip(n.parameters(), r.parameters()):
            torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)
    assert not torch.allclose(nets[0].weight, nets[1].weight)
    assert nets[0].weight.data_ptr() == stacked.stacked[0][0].data_ptr()  # a view into θ[0]


# ---------------------------------------------------------------------------------------------------------
# 100 updates: pack vs unpacked
def _wpo(seed: int):
    from algorithms.wpo.config import WPOConfig

    cfg = WPOConfig().environment("Pendulum-v1").debugging(seed=seed).training(
        policy_hidden=[16], critic_hidden=[16], num_action_samples=4, num_target_action_samples=4,
        train_batch_size_per_learner=32, learning_starts=0, n_step=3, target_update_period=10, lr=1e-3,
        grad_clip=0.5, network={"hidden": [16, 16], "norm": "layer", "activation": "elu", "nap": True,
                                "weight_decay": {"kind": "l2", "coef": 1e-2}})
    return cfg


def _eve(seed: int):
    from algorithms.eve.config import EVEConfig

    return EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=seed).training(
        learning_starts=0, target_update_period=10, grad_clip=1.0, lr=1e-3,
        network={"hidden": [16], "norm": "layer", "activation": "elu", "weight_decay": {"kind": "l2_init", "coef": 1e-2}})


def _q_learner(seed: int):
    """The core's Q-learning baseline: EVE's implementation with epsilon-greedy exploration (no Fisher; autograd)."""
    return _eve(seed).training(exploration="epsilon_greedy")


def _transitions(runner, steps: int) -> dict[str, np.ndarray]:
    return runner.sample(num_timesteps=steps)


def _state(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.module["default_policy"].state_dict().items()}


def _unpacked_and_replicas(make, seeds: list[int]) -> tuple[dict[int, Any], list[Replica]]:
    """Per seed s: an unpacked learner and a pack replica, both built from ``make(s)`` and given the same 200
    transitions sampled by seed s's runner; asserts they start from identical parameters."""
    from algorithms.offpolicy.inprocess import build_runner_and_learner
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    unpacked, replicas = {}, []
    for s in seeds:
        runner, learner = build_runner_and_learner(make(s))
        data = _transitions(runner, 200)
        learner.insert(data)
        unpacked[s] = learner
        r_runner, r_learner = build_runner_and_learner(make(s))
        r_learner.insert(data)
        replicas.append(Replica(s, r_runner, r_learner))
        torch.testing.assert_close(_state(r_learner), _state(learner), atol=0, rtol=0)  # same init per seed
    return unpacked, replicas


@pytest.mark.parametrize(("make", "vectorise"), [(_wpo, True), (_eve, True), (_q_learner, True), (_q_learner, False)],
                         ids=["WPO", "EVE", "Q-learner-vmap", "Q-learner-loop"])
def test_replica_of_a_pack_equals_the_unpacked_learner_after_100_updates(make, vectorise):
    """Seeds 3 and 5: the pack's replica of seed s and an unpacked learner of seed s get the same transitions
    (sampled once by seed s's runner) and draw the same batches (their replays' own generators); after 100
    updates in 4 calls, with per-replica global-norm clipping active, L2 / L2-Init weight decay, NaP (WPO),
    target updates every 10 and EVE's Fisher, every parameter and buffer (targets and Fisher included) agrees
    to float32 round-off, and so do the logged loss statistics. The two replicas differ from each other.
    The Q-learner runs both pack paths: all replicas' losses in one vmapped call (its learner supports it)
    and the per-replica loop; WPO and EVE (posterior Fisher) fall back to the loop."""
    seeds = [3, 5]
    unpacked, replicas = _unpacked_and_replicas(make, seeds)
    pack = ReplicaPack(replicas, make(seeds[0]), vectorise=vectorise)
    assert pack.vectorised == (make is _q_learner and vectorise)
    for _ in range(4):
        pack.run_updates(25, {})
        for learner in unpacked.values():
            learner.run_updates(25, {})
    clipped = []
    for r in replicas:
        ref = unpacked[r.seed]
        assert r.learner.num_updates == ref.num_updates == 100
        got, want = _state(r.learner), _state(ref)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{k}: {m}")
        # the iteration's statistics (sums over the 100 updates, before reduce_stats): same losses and norms
        stats, ref_stats = r.learner._stats["default_policy"], ref._stats["default_policy"]
        assert stats.keys() == ref_stats.keys()
        for k, v in ref_stats.items():
            assert float(stats[k]) == pytest.approx(float(v), rel=1e-4, abs=1e-5), k
        norms = [float(v) / 100 for k, v in stats.items() if k.endswith("_grad_norm")]
        assert norms
        clipped += [n > float(make(r.seed).grad_clip) for n in norms]
    assert any(clipped)  # clipping was active, so per-replica norms mattered
    a, b = (_state(r.learner) for r in replicas)
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert pack.live == [0, 1]


def test_vectorised_pack_keeps_training_live_replicas_when_one_goes_non_finite():
    """Q-learner, seeds 3, 4, 5 in a vectorised pack against unpacked learners: after 50 updates replica 4's
    weights are set to NaN; the next call marks it failed (non-finite gradient norm) and the replicas of
    seeds 3 and 5, their losses now computed on the live rows only, still equal their unpacked learners after
    100 updates; replica 4's NaN did not reach them."""
    seeds = [3, 4, 5]
    unpacked, replicas = _unpacked_and_replicas(_q_learner, seeds)
    pack = ReplicaPack(replicas, _q_learner(seeds[0]))
    assert pack.vectorised
    pack.run_updates(50, {})
    with torch.no_grad():
        for p in replicas[1].learner.module["default_policy"].q.parameters():
            p.fill_(float("nan"))
    pack.run_updates(25, {})
    assert pack.live == [0, 2] and "non-finite" in replicas[1].failed
    pack.run_updates(25, {})
    for s in (3, 5):
        unpacked[s].run_updates(100, {})
    for r in (replicas[0], replicas[2]):
        ref = unpacked[r.seed]
        assert r.learner.num_updates == 100
        got, want = _state(r.learner), _state(ref)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{k}: {m}")
        loss, ref_loss = r.learner._stats["default_policy"]["total_loss"], ref._stats["default_policy"]["total_loss"]
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-4)


def _copy_weights(learner, runner) -> None:
    """Learner module -> runner module in place, as the core's local weight sync."""
    from algorithms.offpolicy.algorithm import _tensor_pairs

    pairs = _tensor_pairs(learner.module["default_policy"].unwrapped(), runner.module)
    with torch.no_grad():
        for (d_owner, d_name), (s_owner, s_name) in pairs:
            getattr(d_owner, d_name).copy_(getattr(s_owner, s_name))
    runner.on_weights_set()


def test_packed_sampling_equals_each_replicas_own_sampling():
    """Q-learner, seeds 3, 5, 6: a pack that samples with one vmapped Q pass for all replicas
    (``packed_actions``) against unpacked runners of the same seeds, 150 sampling rounds through burn-in
    (30 env steps of uniform actions) and ε-greedy (ε 1 -> 0.1 over 50 steps), with updates and weight syncs
    every 10 rounds (each unpacked runner gets its replica's learner weights, so sampling alone is compared);
    replica 5 stops after 80 rounds (the pass then runs on the live rows). Every replay (actions, rewards,
    observations, n-step fields), runner generator, episode count and return metric equals its unpacked
    seed's bit for bit, and the pass's Q values equal each runner's own network's."""
    from algorithms.offpolicy.inprocess import build_runner_and_learner
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)

    def make(seed: int):
        return _q_learner(seed).training(learning_starts=30, epsilon_timesteps=50, epsilon_final=0.1)

    seeds = [3, 5, 6]
    unpacked = {s: build_runner_and_learner(make(s)) for s in seeds}
    replicas = [Replica(s, *build_runner_and_learner(make(s))) for s in seeds]
    pack = ReplicaPack(replicas, make(seeds[0]))
    assert pack.packed_actions and pack.vectorised
    assert not ReplicaPack(replicas, make(seeds[0]), pack_actions=False).packed_actions
    for i in range(150):
        if i == 80:
            replicas[1].failed = "stopped by the test"
        pack.sample()
        for r in replicas:
            if r.failed is None:
                runner, learner = unpacked[r.seed]
                learner.insert(runner.sample())
        if i >= 30 and i % 10 == 0:
            pack.run_updates(5, {})
            pack.sync_weights()
            for r in replicas:
                if r.failed is None:
                    _copy_weights(r.learner, unpacked[r.seed][0])
    greedy = 0
    for r in replicas:
        runner, learner = unpacked[r.seed]
        got, want = r.learner.replay.state_dict(), learner.replay.state_dict()
        assert got["num_env_steps"] == want["num_env_steps"] == (80 if r.seed == 5 else 150)
        for f, value in want["storage"].items():
            assert torch.equal(got["storage"][f], value), (r.seed, f)
        assert torch.equal(r.runner.generator.get_state(), runner.generator.get_state())
        assert r.runner._episode == runner._episode and r.runner._episode[0] >= 8
        m, ref = r.runner.get_metrics(), runner.get_metrics()
        assert m["episode_return_mean"] == ref["episode_return_mean"]
        q = r.runner.module.q(torch.from_numpy(want["storage"]["obs"].numpy()))
        greedy += int((q.argmax(1) == want["storage"]["action"]).sum())
    assert greedy > 100  # the Q pass chose actions, not only the uniform draws
    a, b = (torch.as_tensor(r.learner.replay.stored()["action"]) for r in (replicas[0], replicas[2]))
    assert not torch.equal(a, b)
    x = torch.stack([torch.from_numpy(r.runner._obs) for r in replicas]).float()
    with torch.no_grad():
        packed_q = pack._action_forward([0, 1, 2])([0, 1, 2], x)
        own_q = torch.stack([r.runner.module.q(x[k]) for k, r in enumerate(replicas)])
    assert torch.equal(packed_q, own_q)


# ---------------------------------------------------------------------------------------------------------
# The packed Algorithm
@pytest.mark.slow
@pytest.mark.parametrize("exploration", ["posterior", "epsilon_greedy"])
def test_packed_eve_algorithm_results_restore_and_one_replica_failing(ray_local, tmp_path, exploration):
    """EVE with replica_seeds [0, 1] as one RLlib Algorithm: per-replica results under ``replicas`` (own env
    steps, losses, posterior report), the top level counting one replica's steps; a restored checkpoint
    continues every replica exactly (replay in the checkpoint); a replica whose weights go NaN is reported
    failed once and stopped while the other trains on. With exploration="epsilon_greedy" the pack samples
    through one batched action pass and computes vectorised losses (``ReplicaPack``), the posterior
    exploration replica by replica."""
    from algorithms.eve.config import EVEConfig
    from orchestration.spec import import_builtin_envs

    import_builtin_envs()
    torch.set_num_threads(1)
    cfg = (EVEConfig().environment("bsuite/deep_sea-0").debugging(seed=0)
           .training(learning_starts=50, exploration=exploration))
    cfg.replica_seeds, cfg.checkpoint_replay, cfg.min_sample_timesteps_per_iteration = [0, 1], True, 200
    algo = cfg.build_algo()
    greedy = exploration == "epsilon_greedy"
    assert (algo._pack.vectorised, algo._pack.packed_actions) == (greedy, greedy)
    r = algo.train()
    assert sorted(r["replicas"]) == ["0", "1"] and r["num_env_steps_sampled_lifetime"] == 200
    for rep in r["replicas"].values():
        assert rep["num_env_steps_sampled_lifetime"] == 200
        assert np.isfinite(rep["learners"]["default_policy"]["total_loss"])
        assert ("uncertainty" in rep) == (not greedy)  # the posterior report exists only with posterior exploration
        if not greedy:
            assert rep["uncertainty"]["num_data"] == 200
    assert r["replicas"]["0"]["learners"]["default_policy"]["total_loss"] != \
        r["replicas"]["1"]["learners"]["default_policy"]["total_loss"]
    algo.save_to_path(str(tmp_path))
    restored = cfg.build_algo()
    restored.restore_from_path(str(tmp_path))
    a, b = algo.train(), restored.train()
    for seed in ("0", "1"):
        assert a["replicas"][seed]["learners"]["default_policy"]["total_loss"] == \
            b["replicas"][seed]["learners"]["default_policy"]["total_loss"]
    restored.stop()
    with torch.no_grad():
        for p in algo._pack.replicas[1].learner.module["default_policy"].q.parameters():
            p.fill_(float("nan"))
    r = algo.train()
    assert set(r["replicas"]["1"]) == {"failed"} and "replica stopped" in r["replicas"]["1"]["failed"]
    assert np.isfinite(r["replicas"]["0"]["learners"]["default_policy"]["total_loss"])
    r = algo.train()
    assert sorted(r["replicas"]) == ["0"] and r["replicas"]["0"]["num_env_steps_sampled_lifetime"] == 800
    assert r["system"]["num_replicas_live"] == 1
    algo.stop()


# ---------------------------------------------------------------------------------------------------------
# End to end: a spec with pack_seeds through Tune and MLflow
@pytest.mark.slow
def test_pack_seeds_spec_gives_two_trials_four_child_runs_and_a_four_seed_report(ray_local, tmp_path):
    """EVE on deep_sea size 10, seeds [0, 1, 2, 3], pack_seeds 2: two Tune trials; four MLflow child runs,
    one per seed, each with its own seed param and tag, its pack's tag, the name pattern ``<trial>_seed<s>``,
    and metrics at the steps an unpacked trial logs (200 env steps per iteration); `orchestra report`
    aggregates the four seeds and `orchestra ls` lists the launch."""
    from mlflow import MlflowClient

    from orchestration.report import aggregate_final, load_experiment, write_report
    from orchestration.runner import run
    from orchestration.runs_table import list_runs_table

    t = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "artifacts"),
         "storage": str(tmp_path / "runs")}
    out = run({"name": "packed_eve", "algorithm": "EVE", "env": "bsuite/deep_sea-0", "seeds": [0, 1, 2, 3],
               "pack_seeds": 2, "config": {"min_sample_timesteps_per_iteration": 200, "learning_starts": 50},
               "stop": {"training_iteration": 2}, "metric": "env/episode_return_mean", "tracking": t})
    assert out.num_errors == 0 and len(out.trials) == 2
    client = MlflowClient(t["uri"])
    exp = client.get_experiment_by_name("packed_eve")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1", "2", "3"]
    assert sorted(c.data.tags["orchestra.seed"] for c in children) == ["0", "1", "2", "3"]
    packs = {c.data.tags["orchestra.pack"]: set() for c in children}
    for c in children:
        packs[c.data.tags["orchestra.pack"]].add(c.data.params["seed"])
        assert c.info.status == "FINISHED"
        assert c.info.run_name == f"{c.data.tags['orchestra.pack_name']}_seed{c.data.params['seed']}"
        for key in ("env/episode_return_mean", "learner/total_loss", "uncertainty/q_epistemic_std"):
            history = client.get_metric_history(c.info.run_id, key)
            assert sorted(m.step for m in history) == [200, 400], key
        assert c.data.metrics["system/training_iteration"] == 2
    assert sorted(map(sorted, packs.values())) == [["0", "1"], ["2", "3"]]
    losses = {c.data.params["seed"]: c.data.metrics["learner/total_loss"] for c in children}
    assert len(set(losses.values())) == 4  # four different replicas, not one run copied
    rows = aggregate_final(load_experiment(t["uri"], "packed_eve"), "env/episode_return_mean")
    assert len(rows) == 1 and rows[0]["n"] == 4 and rows[0]["failed"] == 0
    assert write_report(t["uri"], "packed_eve", tmp_path / "report", attach=False).name == "index.html"
    assert (tmp_path / "report" / "index.html").exists()
    assert "packed_eve" in list_runs_table(t["uri"], "packed_eve")


def _packed_trainable(config: dict) -> None:
    """Reports what a packed trial reports: per-replica results under ``replicas``; seed 5 fails at iteration 2."""
    from ray import tune

    for i in range(1, 4):
        replicas = {str(s): {"steps": 10 * i, "learner": {"total_loss": float(s) + i}, "env": {"episode_return_mean": i}}
                    for s in config["seed"] if not (s == 5 and i > 2)}
        if i == 2:
            replicas["5"] = {"failed": "learner/total_loss is nan at update 7: replica stopped"}
        tune.report({"steps": 10 * i, "learner": {"total_loss": 0.0}, "replicas": replicas})


def test_tracking_fans_a_packed_trial_out_to_one_child_run_per_seed(ray_local, tmp_path):
    """The tracking callback on a real Tune run and MLflow store: a trial whose seed is the pack [4, 5] gets
    no child run of its own but one per seed, with that seed's params and metrics at its steps; the replica
    that failed is FAILED alone (its error tagged, no result after it), the other FINISHED."""
    from mlflow import MlflowClient
    from ray import tune

    from orchestration.tracking import MLflowTracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cb = MLflowTracking(uri, "packed_tracking", "launch-1", artifact_location=str(tmp_path / "art"),
                        flush_interval_s=0.2, retry_timeout_s=120)
    tune.Tuner(_packed_trainable, param_space={"seed": [4, 5], "lr": 0.1},
               run_config=tune.RunConfig(name="p", storage_path=str(tmp_path / "runs"), callbacks=[cb],
                                         verbose=0)).fit()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("packed_tracking")
    children = {r.data.params["seed"]: r for r in client.search_runs([exp.experiment_id])
                if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == ["4", "5"]
    ok, failed = children["4"], children["5"]
    assert ok.info.status == "FINISHED" and failed.info.status == "FAILED"
    assert "total_loss is nan at update 7" in failed.data.tags["orchestra.error"]
    assert ok.data.tags["orchestra.pack"] == failed.data.tags["orchestra.pack"]
    assert ok.data.tags["orchestra.pack_seeds"] == "4,5" and ok.data.params["lr"] == "0.1"
    assert [(m.step, m.value) for m in client.get_metric_history(ok.info.run_id, "learner/total_loss")] == [
        (10, 5.0), (20, 6.0), (30, 7.0)]
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "learner/total_loss")] == [10]
