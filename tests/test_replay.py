"""The off-policy core's tensor replay (algorithms/offpolicy): n-step targets against hand-computed episodes,
vectorised insertion, wrap-around, seeded sampling, save/restore, and samples-per-insert bookkeeping."""

from __future__ import annotations

import io
from collections import defaultdict

import pytest
import torch

from algorithms.offpolicy import TensorReplay, nstep_targets, updates_due

GAMMA = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra intra-op threads only contend for the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# One episode: obs s_t = t (t = 0..4), rewards r = [1, 2, 3, 4], gamma = 0.5, then a second episode with
# obs 10, 11, 12, rewards [10, 20], truncated. Hand-computed targets, e.g. for n = 3:
# R_0 = 1 + 0.5*2 + 0.25*3 = 2.75, R_1 = 2 + 0.5*3 + 0.25*4 = 4.5, R_2 = 3 + 0.5*4 = 5, R_3 = 4.
HAND = {
    1: {
        "nstep_return": [1, 2, 3, 4], "nstep": [1, 1, 1, 1], "bootstrap_obs": [1, 2, 3, 4],
        "discount_terminated": [0.5, 0.5, 0.5, 0], "discount_truncated": [0.5, 0.5, 0.5, 0.5],
        "ep2_return": [10, 20], "ep2_nstep": [1, 1], "ep2_bootstrap_obs": [11, 12], "ep2_discount": [0.5, 0.5],
    },
    3: {
        "nstep_return": [2.75, 4.5, 5, 4], "nstep": [3, 3, 2, 1], "bootstrap_obs": [3, 4, 4, 4],
        "discount_terminated": [0.125, 0, 0, 0], "discount_truncated": [0.125, 0.125, 0.25, 0.5],
        "ep2_return": [20, 20], "ep2_nstep": [2, 1], "ep2_bootstrap_obs": [12, 12], "ep2_discount": [0.25, 0.5],
    },
    5: {
        "nstep_return": [3.25, 4.5, 5, 4], "nstep": [4, 3, 2, 1], "bootstrap_obs": [4, 4, 4, 4],
        "discount_terminated": [0, 0, 0, 0], "discount_truncated": [0.0625, 0.125, 0.25, 0.5],
        "ep2_return": [20, 20], "ep2_nstep": [2, 1], "ep2_bootstrap_obs": [12, 12], "ep2_discount": [0.25, 0.5],
    },
}


def _f(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("end", ["terminated", "truncated"])
def test_nstep_targets_hand_computed_episode(n: int, end: str):
    hand = HAND[n]
    rewards = [1.0, 2.0, 3.0, 4.0]

    pure = nstep_targets(_f(rewards), end == "terminated", GAMMA, n)
    torch.testing.assert_close(pure["nstep_return"], _f(hand["nstep_return"]))
    assert pure["nstep"].tolist() == hand["nstep"]
    assert pure["bootstrap_index"].tolist() == hand["bootstrap_obs"]
    torch.testing.assert_close(pure["bootstrap_discount"], _f(hand[f"discount_{end}"]))

    replay = TensorReplay(100, 1, (1,), n_step=n, gamma=GAMMA)
    sizes = []
    for t, r in enumerate(rewards):
        last = t == len(rewards) - 1
        replay.add([[t]], [0.0], [r], [[t + 1]], [last and end == "terminated"], [last and end == "truncated"])
        sizes.append(len(replay))
    # a step leaves its window once n steps are in it, and every pending step leaves at the episode's end
    assert sizes == [max(0, t + 2 - n) for t in range(3)] + [4]
    for t, r in enumerate([10.0, 20.0]):
        replay.add([[10 + t]], [0.0], [r], [[11 + t]], [False], [t == 1])
    got = replay.stored()
    assert got["obs"][:, 0].tolist() == [0, 1, 2, 3, 10, 11]
    torch.testing.assert_close(got["nstep_return"], _f(hand["nstep_return"] + hand["ep2_return"]))
    assert got["nstep"].tolist() == hand["nstep"] + hand["ep2_nstep"]
    assert got["bootstrap_obs"][:, 0].tolist() == hand["bootstrap_obs"] + hand["ep2_bootstrap_obs"]
    torch.testing.assert_close(got["bootstrap_discount"], _f(hand[f"discount_{end}"] + hand["ep2_discount"]))
    # one-step fields
    assert got["reward"].tolist() == rewards + [10.0, 20.0]
    assert got["next_obs"][:, 0].tolist() == [1, 2, 3, 4, 11, 12]
    assert got["terminated"].tolist() == [False, False, False, end == "terminated", False, False]
    assert got["truncated"].tolist() == [False, False, False, end == "truncated", False, True]


def test_vectorised_envs_ending_at_different_steps_match_per_episode_targets():
    """E = 3 envs with random episode ends (terminated or truncated) and skipped (invalid) steps."""
    num_envs, n, gamma, steps = 3, 3, 0.9, 60
    g = torch.Generator().manual_seed(0)
    replay = TensorReplay(1000, num_envs, (2,), (1,), n_step=n, gamma=gamma)
    episodes: dict[int, list[list[tuple[int, float]]]] = defaultdict(lambda: [[]])  # env -> [[(t, r)]]
    ends: dict[int, list[bool]] = defaultdict(list)  # env -> terminated flag of each ended episode
    for t in range(steps):
        u = torch.rand(num_envs, generator=g)
        term, trunc = u < 0.15, (u >= 0.15) & (u < 0.25)
        valid = torch.rand(num_envs, generator=g) > 0.1
        reward = torch.randn(num_envs, generator=g)
        env = torch.arange(num_envs, dtype=torch.float32)
        obs = torch.stack([env, torch.full((num_envs,), 2.0 * t)], dim=1)  # unique id (env, 2t)
        next_obs = obs + torch.tensor([0.0, 1.0])  # (env, 2t + 1)
        replay.add(obs, torch.zeros(num_envs, 1), reward, next_obs, term, trunc, valid=valid)
        for e in range(num_envs):
            if valid[e]:
                episodes[e][-1].append((t, float(reward[e])))
                if term[e] or trunc[e]:
                    ends[e].append(bool(term[e]))
                    episodes[e].append([])

    expected = {}
    for e in range(num_envs):
        for i, episode in enumerate(episodes[e]):
            if not episode:
                continue
            ended = i < len(ends[e])
            times = [t for t, _ in episode]
            targets = nstep_targets(torch.tensor([r for _, r in episode]), ended and ends[e][i], gamma, n)
            for j, t in enumerate(times):
                if not ended and j + n > len(times):
                    continue  # still in its env's pending window
                k = int(targets["nstep"][j])
                expected[(e, 2 * t)] = (
                    float(targets["nstep_return"][j]), k, 2 * times[j + k - 1] + 1, float(targets["bootstrap_discount"][j])
                )
    stored = replay.stored()
    assert len(replay) == len(expected) == replay.num_transitions
    assert replay.num_env_steps == sum(len(ep) for e in episodes for ep in episodes[e])
    assert sum(1 for e in ends for x in ends[e] if x) > 2 and sum(1 for e in ends for x in ends[e] if not x) > 2
    seen = set()
    for i in range(len(replay)):
        key = (int(stored["obs"][i, 0]), int(stored["obs"][i, 1]))
        ret, k, boot_t, disc = expected[key]
        seen.add(key)
        assert abs(float(stored["nstep_return"][i]) - ret) < 1e-5, key
        assert int(stored["nstep"][i]) == k, key
        assert stored["bootstrap_obs"][i].tolist() == [key[0], boot_t], key
        assert abs(float(stored["bootstrap_discount"][i]) - disc) < 1e-6, key
    assert seen == set(expected)


def _ids(replay: TensorReplay) -> list[int]:
    return [int(x) for x in replay.stored()["obs"][:, 0]]


def test_capacity_wrap_around():
    replay = TensorReplay(5, 2, (1,), n_step=1)
    for t in range(6):  # 12 transitions, ids 10*t + env
        replay.add([[10 * t], [10 * t + 1]], [0.0, 0.0], [0.0, 0.0], [[0], [0]], [False, False], [False, False])
    assert (len(replay), replay.ptr, replay.num_transitions) == (5, 12 % 5, 12)
    # slots hold the 5 newest: 41, 50, 51 written last at slots 0, 1 (after 40 at slot 4 ... wrap)
    assert _ids(replay) == [50, 51, 31, 40, 41]
    assert set(replay.sample(64)["obs"][:, 0].int().tolist()) <= {31, 40, 41, 50, 51}

    small = TensorReplay(3, 4, (1,), n_step=1)  # one insert larger than the capacity
    small.add([[0], [1], [2], [3]], [0.0] * 4, [0.0] * 4, [[0]] * 4, [False] * 4, [False] * 4)
    assert sorted(_ids(small)) == [1, 2, 3] and small.num_transitions == 4 and len(small) == 3


def _filled(seed: int) -> TensorReplay:
    replay = TensorReplay(10, 1, (2,), (), n_step=1, obs_dtype=torch.uint8, action_dtype=torch.int64, seed=seed)
    for t in range(10):
        replay.add([[t, 255]], [t % 4], [float(t)], [[t + 1, 0]], [False], [False])
    return replay


def test_seeded_uniform_sampling_and_dtypes():
    replay = _filled(seed=3)
    batch = replay.sample(20000)
    assert batch["obs"].dtype == torch.uint8 and batch["action"].dtype == torch.int64
    assert batch["obs"].shape == (20000, 2) and batch["action"].shape == (20000,)
    assert torch.equal(batch["obs"][:, 0].long(), batch["index"]) and bool((batch["obs"][:, 1] == 255).all())
    counts = torch.bincount(batch["index"], minlength=10).float()
    assert bool(((counts - 2000).abs() < 5 * (20000 * 0.1 * 0.9) ** 0.5).all()), counts
    assert torch.equal(_filled(seed=3).sample(50)["index"], _filled(seed=3).sample(50)["index"])
    assert not torch.equal(_filled(seed=3).sample(50)["index"], _filled(seed=4).sample(50)["index"])


def _random_step(g: torch.Generator, num_envs: int, t: int):
    obs = torch.randn(num_envs, 3, generator=g)
    u = torch.rand(num_envs, generator=g)
    return (obs, torch.randn(num_envs, 2, generator=g), torch.randn(num_envs, generator=g),
            obs + 1, u < 0.1, (u >= 0.1) & (u < 0.2))


def test_save_restore_continues_bit_identically():
    g = torch.Generator().manual_seed(1)
    replay = TensorReplay(64, 2, (3,), (2,), n_step=3, gamma=0.99, seed=7)
    for t in range(20):
        replay.add(*_random_step(g, 2, t))
        if len(replay):
            replay.sample(8)
    buf = io.BytesIO()
    torch.save(replay.state_dict(), buf)
    buf.seek(0)
    restored = TensorReplay(64, 2, (3,), (2,), n_step=3, gamma=0.99, seed=12345)
    restored.load_state_dict(torch.load(buf))

    g_cont = torch.Generator().manual_seed(2)
    steps = [_random_step(g_cont, 2, t) for t in range(40)]  # wraps the 64-slot buffer
    for step in steps:
        for r in (replay, restored):
            r.add(*step)
        a, b = replay.sample(16), restored.sample(16)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert replay.num_transitions > 64 and (replay.ptr, replay.size) == (restored.ptr, restored.size)

    wrong = TensorReplay(64, 2, (3,), (2,), n_step=5, gamma=0.99)
    with pytest.raises(ValueError, match="n_step=3"):
        wrong.load_state_dict(replay.state_dict())


def test_updates_due_ratio_bookkeeping():
    # spi 32, batch 256: one update per 8 env steps after learning_starts = 1000
    assert updates_due(999, 256, 32, 0, learning_starts=1000) == 0
    assert updates_due(1007, 256, 32, 0, learning_starts=1000) == 0
    assert updates_due(1008, 256, 32, 0, learning_starts=1000) == 1
    assert updates_due(1016, 256, 32, 1, learning_starts=1000) == 1
    assert updates_due(2000, 256, 32, 0, learning_starts=1000) == 125
    assert updates_due(2000, 256, 32, 200, learning_starts=1000) == 0
    assert updates_due(1010, 256, 256, 5, learning_starts=1000) == 5  # spi = batch: one per env step

    # a simulated loop with 4 envs per step: the ratio never overshoots and is short by < one batch
    env_steps = updates = 0
    for _ in range(3000):
        env_steps += 4
        updates += updates_due(env_steps, 256, 32, updates, learning_starts=1000)
        if env_steps > 1000:
            ratio = updates * 256 / (env_steps - 1000)
            assert ratio <= 32 and ratio > 32 - 256 / (env_steps - 1000)
    assert updates == (12000 - 1000) * 32 // 256

    for kwargs, match in (({"batch_size": 0}, "batch_size"), ({"spi": 0.0}, "spi"), ({"updates_done": -1}, ">= 0")):
        args = {"env_steps_inserted": 10, "batch_size": 256, "spi": 32.0, "updates_done": 0, **kwargs}
        with pytest.raises(ValueError, match=match):
            updates_due(**args)


def test_bad_inputs_raise_clear_errors():
    replay = TensorReplay(10, 2, (3,), n_step=2)
    with pytest.raises(ValueError, match=r"obs has shape \(2, 4\); expected \(2, 3\)"):
        replay.add(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2), torch.zeros(2, 3), [False] * 2, [False] * 2)
    with pytest.raises(ValueError, match=r"reward has shape \(3,\)"):
        replay.add(torch.zeros(2, 3), torch.zeros(2), torch.zeros(3), torch.zeros(2, 3), [False] * 2, [False] * 2)
    with pytest.raises(ValueError, match="empty replay"):
        replay.sample(4)
    with pytest.raises(ValueError, match="capacity"):
        TensorReplay(0, 1, (3,))
    with pytest.raises(ValueError, match="gamma"):
        TensorReplay(10, 1, (3,), gamma=1.5)
    with pytest.raises(ValueError, match="n must be"):
        nstep_targets(torch.zeros(3), True, 0.9, 0)


def test_tensor_write_path_matches_numpy_write_path():
    """Non-CPU devices write through torch (one copy per dtype); on CPU that path must store the same."""
    g = torch.Generator().manual_seed(4)
    steps = [_random_step(g, 3, t) for t in range(30)]
    fast = TensorReplay(16, 3, (3,), (2,), n_step=3, seed=1)
    plain = TensorReplay(16, 3, (3,), (2,), n_step=3, seed=1)
    plain._storage_np = None  # what a CUDA replay does
    for step in steps:
        assert fast.add(*step) == plain.add(*step)
    for key, value in fast.stored().items():
        assert torch.equal(value, plain.stored()[key]), key


def test_one_step_path_stores_exactly_what_the_general_path_stores():
    """n = 1 without ``valid`` takes the one-step path; ``valid`` all True takes the general window path. Same
    steps (3 envs, terminations, truncations, a reward of -0.0, the 16-slot buffer wrapping): same return
    values, storage, window state and counters, bit for bit."""
    g = torch.Generator().manual_seed(5)
    steps = [_random_step(g, 3, t) for t in range(40)]
    steps[0][2][1] = -0.0
    one = TensorReplay(16, 3, (3,), (2,), n_step=1, gamma=0.9, seed=1)
    general = TensorReplay(16, 3, (3,), (2,), n_step=1, gamma=0.9, seed=1)
    for step in steps:
        assert one.add(*step) == general.add(*step, valid=[True] * 3) == 3
    a, b = one.state_dict(), general.state_dict()
    assert a.keys() == b.keys() and one.num_transitions == 120
    assert any(bool(t[4].any()) for t in steps) and any(bool(t[5].any()) for t in steps)
    for key in ("storage", "pending"):
        for f in a[key]:
            assert a[key][f].dtype == b[key][f].dtype and torch.equal(a[key][f], b[key][f]), (key, f)
            assert (a[key][f].view(torch.uint8) == b[key][f].view(torch.uint8)).all(), (key, f)  # signed zeros too
    for key in ("pending_return", "head", "count"):
        assert torch.equal(a[key], b[key]), key
    assert [a[k] for k in ("ptr", "size", "num_env_steps", "num_transitions")] == \
        [b[k] for k in ("ptr", "size", "num_env_steps", "num_transitions")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_storage_samples_like_cpu():
    g = torch.Generator().manual_seed(3)
    steps = [_random_step(g, 2, t) for t in range(30)]
    cpu = TensorReplay(32, 2, (3,), (2,), n_step=3, seed=1)
    gpu = TensorReplay(32, 2, (3,), (2,), n_step=3, seed=1, device="cuda")
    for step in steps:
        cpu.add(*step)
        gpu.add(*(x.cuda() for x in step))
    a, b = cpu.sample(64), gpu.sample(64)
    assert b["obs"].is_cuda
    for key in a:
        torch.testing.assert_close(a[key], b[key].cpu(), rtol=1e-6, atol=1e-6)
