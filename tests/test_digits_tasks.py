"""Nonstationary digits tasks: result keys, exact resume, and the plasticity ordering of the papers."""

from __future__ import annotations

import io

import pytest
import torch
from pydantic import ValidationError

from algorithms.registry import get_task_class, load_builtin_plugins
from algorithms.tasks.digits import DigitsPermuted, DigitsRandomLabels, DigitsShiftingRegression

torch.set_num_threads(1)  # small networks: extra threads only contend on the shared 2-core machine

TINY = {
    "network": {
        "hidden": [32, 32],
        "norm": "layer",
        "nap": True,
        "weight_decay": {"kind": "l2_init", "coef": 0.1},
        "lr_schedule": {"kind": "warmup_cosine", "warmup_steps": 3, "restart_at_task_boundary": True},
    },
    "task_steps": 20,
    "steps_per_iteration": 10,
    "num_tasks": 3,
    "num_examples": 64,
    "batch_size": 16,
    "probe_size": 32,
}


def _make(cls, seed=0, **overrides):
    return cls(cls.Config(**{**TINY, **overrides}), seed=seed)


@pytest.mark.parametrize("cls", [DigitsRandomLabels, DigitsPermuted, DigitsShiftingRegression])
def test_resume_continues_bit_identically(cls):
    straight = _make(cls)
    expected = [straight.train() for _ in range(5)]

    first = _make(cls)
    got = [first.train() for _ in range(2)]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # through bytes, as a checkpoint on disk would
    buf.seek(0)
    restored = _make(cls, seed=0)
    restored.load_state_dict(torch.load(buf, weights_only=False))
    got += [restored.train() for _ in range(3)]  # crosses a task boundary: new task, new fresh net

    assert got == expected
    for a, b in zip(straight.continuing.net.parameters(), restored.continuing.net.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.fresh.net.parameters(), restored.fresh.net.parameters()):
        assert torch.equal(a, b)


def test_result_keys_and_task_boundaries():
    task = _make(DigitsRandomLabels, num_tasks=2)
    results = [task.train() for _ in range(4)]
    assert [r["train/task_id"] for r in results] == [0, 0, 1, 1]
    assert task.steps == 40
    for r in results:
        for key in ("train/loss", "train/accuracy", "train/fresh_loss", "train/fresh_accuracy",
                    "plasticity/continuing/effective_rank", "plasticity/continuing/dormant_ratio",
                    "plasticity/continuing/weight_norm", "plasticity/fresh/effective_rank"):  # fmt: skip
            assert key in r and isinstance(r[key], float), key
        assert 0.0 <= r["train/accuracy"] <= 1.0
        assert r["train/accuracy_ratio"] == pytest.approx(r["train/accuracy"] / r["train/fresh_accuracy"])
    ends = [i for i, r in enumerate(results) if "train/task_final_accuracy" in r]
    assert ends == [1, 3]
    r = results[1]
    assert r["train/task_final_accuracy_ratio"] == pytest.approx(
        r["train/task_final_accuracy"] / r["train/task_final_fresh_accuracy"]
    )
    assert [r["done"] for r in results] == [False, False, False, True]
    with pytest.raises(RuntimeError, match="num_tasks=2"):
        task.train()


def test_tasks_change_what_they_should():
    labels = _make(DigitsRandomLabels)
    y0 = labels._targets().clone()
    x0 = labels._inputs().clone()
    for _ in range(3):
        labels.train()
    assert torch.equal(labels._inputs(), x0) and not torch.equal(labels._targets(), y0)

    perm = _make(DigitsPermuted)
    x0, y0 = perm._inputs().clone(), perm._targets().clone()
    for _ in range(3):
        perm.train()
    assert torch.equal(perm._targets(), y0) and not torch.equal(perm._inputs(), x0)
    # the same pixels, in another order
    assert torch.equal(perm._inputs().sort(dim=1).values, x0.sort(dim=1).values)

    reg = _make(DigitsShiftingRegression, target_mean=100.0, target_scale=10.0)
    means = []
    for _ in range(3):
        means.append(float(reg._targets().mean()))
        reg.train()
        r = reg.train()
    assert "train/r2" in r and "train/accuracy" not in r
    assert r["train/task_final_mse_ratio"] == pytest.approx(
        r["train/task_final_mse"] / r["train/task_final_fresh_mse"]
    )
    assert max(means) - min(means) > 5.0  # the task mean moves by more than the target spread


def test_probe_inputs_and_modules():
    task = _make(DigitsPermuted)
    probe = task.probe_inputs(16)
    assert probe.shape == (16, 64)
    assert torch.equal(task.probe_inputs(16), probe)
    assert set(task.modules()) == {"continuing", "fresh"}
    no_ref = _make(DigitsPermuted, fresh_reference=False)
    assert set(no_ref.modules()) == {"continuing"}
    r = no_ref.train()
    assert "train/fresh_accuracy" not in r


def test_config_errors_name_the_keys():
    with pytest.raises(ValidationError, match="task_steps.*steps_per_iteration"):
        DigitsRandomLabels.Config(task_steps=250, steps_per_iteration=100)
    with pytest.raises(ValidationError, match="optimizer"):
        DigitsRandomLabels.Config(optimizer="rmsprop")
    with pytest.raises(ValidationError, match="extra"):
        DigitsRandomLabels.Config(netwrok={})


def test_tasks_are_registered():
    load_builtin_plugins()
    assert get_task_class("digits_random_labels") is DigitsRandomLabels
    assert get_task_class("digits_permuted") is DigitsPermuted
    assert get_task_class("digits_shifting_regression") is DigitsShiftingRegression


# --- the papers' ordering, short form -------------------------------------------------------------
# Random-label memorisation of 512 digits, 6 tasks of 200 Adam steps (lr 5e-3), MLP 128-128.
# Measured on seeds 0-4 with this short form: at the last task the plain MLP reaches 0.47-0.65 of the fresh
# net's accuracy, its effective rank (mean over hidden layers) 0.83-0.86 of fresh and its dormant ratio
# ~0.3 (fresh ~0.03); LN+L2 and NaP stay at 0.99-1.03 of fresh in accuracy and effective rank.

SHORT = {
    "task_steps": 200,
    "steps_per_iteration": 100,
    "num_tasks": 6,
    "num_examples": 512,
    "batch_size": 64,
    "lr": 5e-3,
}
VARIANTS = {
    "plain": {"hidden": [128, 128]},
    "ln_l2": {"hidden": [128, 128], "norm": "layer", "weight_decay": {"kind": "l2", "coef": 0.1}},
    "nap": {"hidden": [128, 128], "norm": "layer", "nap": True},
}


def _final(variant: str, seed: int = 0) -> dict[str, float]:
    cfg = DigitsRandomLabels.Config(**SHORT, network=VARIANTS[variant], plasticity_every=2)
    task = DigitsRandomLabels(cfg, seed=seed)
    while not (r := task.train())["done"]:
        pass
    return r


def test_plain_mlp_loses_trainability_while_ln_l2_and_nap_stay_near_fresh():
    final = {v: _final(v) for v in VARIANTS}
    ratio = {v: r["train/task_final_accuracy_ratio"] for v, r in final.items()}
    rank_ratio = {
        v: r["plasticity/continuing/effective_rank"] / r["plasticity/fresh/effective_rank"] for v, r in final.items()
    }
    assert ratio["plain"] < 0.8, ratio
    assert ratio["ln_l2"] > 0.93 and ratio["nap"] > 0.93, ratio
    assert rank_ratio["plain"] < min(rank_ratio["ln_l2"], rank_ratio["nap"]) - 0.08, rank_ratio
    assert min(rank_ratio["ln_l2"], rank_ratio["nap"]) > 0.95, rank_ratio
    plain = final["plain"]
    assert plain["plasticity/continuing/dormant_ratio"] > plain["plasticity/fresh/dormant_ratio"] + 0.1


def test_task_plasticity_keys_match_the_plasticity_diagnostic():
    """Same key, same definition: the task's own numbers equal the registered diagnostic's."""
    from algorithms.diagnostics.rllib_plasticity import PlasticityHook, PlasticitySettings

    task = _make(DigitsRandomLabels, plasticity_every=1)
    hook = PlasticityHook(PlasticitySettings(every=1, probe_size=TINY["probe_size"], tau=0.025))
    r = task.train()
    m = hook.on_iteration(task, 1)
    shared = [k for k in r if k.startswith("plasticity/")]
    assert len(shared) == 6
    for key in shared:
        assert m[key] == pytest.approx(r[key], rel=1e-9), key
