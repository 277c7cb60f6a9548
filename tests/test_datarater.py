"""DataRater: filtering rules, AUROC, meta-training on digits, Ray actors vs in-process, checkpoints, text corpus."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from algorithms.datarater.filtering import (
    accept,
    acceptance_threshold,
    auroc,
    batch_top_k,
    candidates_for,
)
from algorithms.datarater.meta_training import MetaSettings, RaterPopulation
from algorithms.tasks.datarater_digits import (
    DigitsDataRater,
    DigitsDataRaterConfig,
    DigitsProblem,
    load_corrupted_digits,
)

# --- filtering rules on hand-made scores -------------------------------------------------------------


def test_candidates_for_rho():
    assert candidates_for(48, 0.25) == 64  # 48 / 0.75
    assert candidates_for(64, 0.0) == 64
    assert candidates_for(10, 0.5) == 20
    assert candidates_for(10, 0.3) == 15  # ⌈14.29⌉
    with pytest.raises(ValueError, match="rho=1.0: allowed values are 0 <= rho < 1"):
        candidates_for(10, 1.0)


def test_batch_top_k_drops_lowest_scores():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, -2.0, 0.1, 0.0])
    # Draw 8, keep N = 6 (ρ = 0.25): drop the two lowest (-2.0 at 5, -1.0 at 1).
    assert batch_top_k(scores, 6).tolist() == [0, 2, 3, 4, 6, 7]
    # Ties at the cut are broken towards the lower index: keep one of the two 0.3s -> index 0.
    assert batch_top_k(scores, 3).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="n_keep=9"):
        batch_top_k(scores, 9)


def test_per_example_acceptance_rule():
    reference = torch.arange(0.0, 101.0)  # 0..100: the ρ-quantile is 100ρ
    q = acceptance_threshold(reference, 0.25)
    assert q == pytest.approx(25.0)
    assert accept(torch.tensor([24.9, 25.0, 80.0, -3.0]), q).tolist() == [False, True, True, False]
    # On fresh draws from the same distribution the accepted fraction is about 1 − ρ.
    g = torch.Generator().manual_seed(0)
    ref, fresh = torch.randn(20_000, generator=g), torch.randn(20_000, generator=g)
    frac = accept(fresh, acceptance_threshold(ref, 0.4)).float().mean().item()
    assert frac == pytest.approx(0.6, abs=0.015)


def test_auroc_hand_computed_and_brute_force():
    # clean {3, 2} vs corrupted {1, 2}: pairs (3>1) (3>2) (2>1) (2=2 -> ½) = 3.5 / 4.
    scores = torch.tensor([3.0, 2.0, 1.0, 2.0])
    corrupted = torch.tensor([False, False, True, True])
    assert auroc(scores, corrupted) == pytest.approx(0.875)
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 5, (40,), generator=g).float()
    c = torch.rand(40, generator=g) < 0.3
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(s[~c], s[c])]
    assert auroc(s, c) == pytest.approx(sum(pairs) / len(pairs))
    assert auroc(-s, c) == pytest.approx(1 - sum(pairs) / len(pairs))


def test_steps_to_reach_and_compute_saved_hand_computed():
    from algorithms.datarater.evaluation import Curve, break_even_trainings, compute_saved, steps_to_reach

    cv = Curve([10, 20, 30, 40], [3.0, 2.5, 2.0, 1.5])
    assert steps_to_reach(cv, 2.2) == 30.0  # first evaluated step with loss <= 2.2
    # Interpolated: the line from (20, 2.5) to (30, 2.0) crosses 2.2 at 20 + 10 * 0.3 / 0.5 = 26.
    assert steps_to_reach(cv, 2.2, interpolate=True) == pytest.approx(26.0)
    assert steps_to_reach(cv, 3.5, interpolate=True) == 10.0  # already below at the first evaluation
    assert steps_to_reach(cv, 1.0) is None
    # S = 40 unfiltered steps of F = 10; filtered reaches the target at s* = 26 with rater cost 1 per step:
    # saved = 1 − 26·11 / 400 = 0.285; with C_meta = 57: 1 − (286 + 57)/400 = 0.1425.
    assert compute_saved(26.0, 40, 10.0, 1.0) == pytest.approx(0.285)
    assert compute_saved(26.0, 40, 10.0, 1.0, 57.0) == pytest.approx(0.1425)
    # Break-even: 57 / (400 − 286) = 0.5 trainings; 1140 FLOPs of meta-training need 10.
    assert break_even_trainings(26.0, 40, 10.0, 1.0, 57.0) == pytest.approx(0.5)
    assert break_even_trainings(26.0, 40, 10.0, 1.0, 1140.0) == pytest.approx(10.0)
    assert break_even_trainings(40.0, 40, 10.0, 1.0, 57.0) == float("inf")  # no saving per training
    assert compute_saved(None, 40, 10.0, 1.0) != compute_saved(None, 40, 10.0, 1.0)  # NaN


# --- digits meta-training ------------------------------------------------------------------------------


def test_corrupted_digits_split():
    d = load_corrupted_digits(0.4, 0, 400, 300)
    n = len(d["pool_x"])
    assert n == 1797 - 700
    codes = d["pool_code"]
    assert int((codes > 0).sum()) == round(0.4 * n)
    clean = load_corrupted_digits(0.0, 0, 400, 300)
    lab = codes == 1
    assert (d["pool_y"][lab] != clean["pool_y"][lab]).all()  # random labels are always wrong
    assert torch.equal(d["pool_x"][lab], clean["pool_x"][lab])
    noise = codes == 2
    assert not torch.allclose(d["pool_x"][noise], clean["pool_x"][noise])


SMALL = dict(population=2, T=2, batch_size=32, outer_batch_size=32, meta_steps_per_iteration=3, reinit_every=4,
             outer_lr=1e-2, n_test=200, n_outer=200)


def test_short_digits_run_learns_to_rate_corruption():
    torch.set_num_threads(1)
    task = DigitsDataRater(DigitsDataRaterConfig(**{**SMALL, "meta_steps_per_iteration": 10}), seed=0)
    start = task.score_metrics()
    for _ in range(4):
        m = task.train()
    assert m["meta/step"] == 40 and task.steps == 40 * 2 * 2
    assert abs(start["meta/auroc"] - 0.5) < 0.2  # an untrained rater does not separate them
    assert m["meta/auroc/noise_image"] >= 0.95, m
    assert m["meta/auroc"] >= 0.75, m
    assert m["meta/score/clean"] > m["meta/score/noise_image"]


def test_ray_actors_equal_in_process(ray_local):
    torch.set_num_threads(1)
    problem = DigitsProblem(load_corrupted_digits(0.3, 0, 200, 200), hidden=16, rater_hidden=16)
    settings = MetaSettings(engine="mixflow", T=2, batch_size=16, outer_batch_size=16, reinit_every=2,
                            inner_lr=1e-2, outer_lr=1e-2, threads=1)
    local = RaterPopulation(problem, settings, seed=3, population=2, backend="local")
    remote = RaterPopulation(problem, settings, seed=3, population=2, backend="ray", actor_options={"num_cpus": 1})
    try:
        for _ in range(3):
            a, b = local.meta_step(), remote.meta_step()
            assert a == pytest.approx(b, rel=1e-6)
        for x, y in zip(local.eta, remote.eta, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert not torch.equal(local.eta[0], RaterPopulation(problem, settings, 3, 2).eta[0])  # it moved
    finally:
        remote.shutdown()


def test_checkpoint_continuation_is_bit_identical(tmp_path):
    torch.set_num_threads(1)
    cfg = DigitsDataRaterConfig(**{**SMALL, "engine": "reverse_remat", "eval_every": 2, "eval_steps": 20,
                                   "eval_interval": 10, "eval_rhos": [0.5]})
    a = DigitsDataRater(cfg, seed=5, artifact_dir=tmp_path)
    a.train()
    state = copy.deepcopy(a.state_dict())
    ma = a.train()
    b = DigitsDataRater(cfg, seed=5)
    b.load_state_dict(state)
    mb = b.train()
    assert ma.keys() == mb.keys()
    for k in ma:
        if "seconds" not in k:
            assert ma[k] == mb[k] or (ma[k] != ma[k] and mb[k] != mb[k]), k
    for x, y in zip(a.population.eta, b.population.eta, strict=True):
        assert torch.equal(x, y)
    # The evaluation ran at iteration 2: filtered/unfiltered losses, compute accounting, a histogram.
    assert {"eval/loss/unfiltered", "eval/loss/rho_0.5", "eval/compute_saved/rho_0.5",
            "eval/compute_saved_with_meta/rho_0.5", "eval/flops/train_step"} <= ma.keys()
    assert ma["eval/flops/train_step"] > 0 and ma["eval/flops/meta_training"] > 0
    assert list(tmp_path.glob("score_histogram_meta_step_*.png"))


def test_config_errors_name_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="eval_rhos"):
        DigitsDataRaterConfig(eval_rhos=[0.5, 1.2])
    with pytest.raises(ValidationError, match="engine"):
        DigitsDataRaterConfig(engine="forward")


# --- text corpus -------------------------------------------------------------------------------------------


def test_text_corpus_and_one_iteration(tmp_path):
    import pyarrow.parquet as pq

    from algorithms.tasks.datarater_text import (
        CORRUPTIONS,
        TextDataRater,
        TextDataRaterConfig,
        prepare_corpus,
    )

    torch.set_num_threads(1)
    cfg = TextDataRaterConfig(cache_dir=str(tmp_path), max_files=6, doc_bytes=256, seq_len=32, d_model=16,
                              n_layers=1, rater_d_model=8, population=1, batch_size=8, outer_batch_size=8,
                              meta_steps_per_iteration=1, score_examples=64, heldout_examples=32)
    path = prepare_corpus(cfg)
    table = pq.read_table(path)
    assert table.column_names == ["text", "source", "corruption", "split"]
    rows = table.to_pylist()
    assert {r["corruption"] for r in rows} == set(CORRUPTIONS)
    assert all(r["corruption"] == "clean" for r in rows if r["split"] != "train")
    assert all(len(r["text"].encode("latin-1")) == 256 for r in rows)
    assert all(r["source"].endswith(".py") for r in rows)
    m = TextDataRater(cfg, seed=0).train()
    assert 4.0 < m["meta/outer_loss"] < 6.0  # ≈ ln 256 = 5.55 for an untrained byte model
    assert {f"meta/score/{c}" for c in CORRUPTIONS} <= m.keys()


PACKAGES_SMALL = dict(corpus="packages", max_bytes=96 * 1024, doc_bytes=256, seq_len=32, d_model=16, n_layers=1,
                      rater_d_model=8, population=1, batch_size=8, outer_batch_size=8, meta_steps_per_iteration=1,
                      score_examples=64, heldout_examples=32)


def test_stdlib_corpus_is_unchanged_by_the_corpus_setting(tmp_path):
    import hashlib
    import json
    import sysconfig
    from pathlib import Path

    import pyarrow.parquet as pq

    from algorithms.tasks.datarater_text import TextDataRaterConfig, prepare_corpus

    cfg = TextDataRaterConfig(cache_dir=str(tmp_path), max_files=5, doc_bytes=256)
    assert cfg.corpus == "stdlib"
    # The cache tag as computed before the packages corpus existed: the same settings give the same file.
    old = {"max_files": 5, "doc_bytes": 256, "corrupt_fraction": 0.5, "outer_fraction": 0.1,
           "heldout_fraction": 0.1, "data_seed": 0}
    tag = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    path = prepare_corpus(cfg)
    assert path.name == f"stdlib_corpus_{tag}.parquet"
    t = pq.read_table(path)
    assert t.column_names == ["text", "source", "corruption", "split"] and not t.schema.metadata
    # Clean documents are the 256-byte pieces of the first 5 stdlib .py files, in file order.
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces = [(d[i : i + 256], str(f.relative_to(root))) for f in sorted(root.glob("*.py"))[:5]
              for d in [f.read_bytes()] for i in range(0, len(d) - 255, 256)]
    rows = t.to_pylist()
    assert len(rows) == len(pieces)
    for r, (text, src) in zip(rows, pieces, strict=True):
        assert r["source"] == src
        assert (r["text"].encode("latin-1") == text) == (r["corruption"] == "clean")


def test_packages_corpus_kinds_determinism_and_cache(tmp_path):
    from pathlib import Path

    import pyarrow.parquet as pq

    from algorithms.tasks.datarater_text import (
        CORRUPTIONS,
        KINDS,
        TextDataRaterConfig,
        file_list_hash,
        list_package_files,
        prepare_corpus,
    )

    cfg = TextDataRaterConfig(cache_dir=str(tmp_path / "a"), **PACKAGES_SMALL)
    path = prepare_corpus(cfg)
    table = pq.read_table(path)
    assert table.column_names == ["text", "source", "kind", "corruption", "split"]
    rows = table.to_pylist()
    assert sum(len(r["text"]) for r in rows) <= 96 * 1024 and len(rows) >= 96 * 1024 // 256 - 3
    assert {r["kind"] for r in rows} == set(KINDS)
    assert {r["corruption"] for r in rows} == set(CORRUPTIONS)
    assert {r["source"].split("/")[0] for r in rows} <= {"stdlib", "site-packages"}
    # Never this project's own code or its editable-install finder.
    assert not any(r["source"].split("/")[1] in ("algorithms", "orchestration") or "__editable__" in r["source"]
                   for r in rows)
    assert all(r["source"].endswith(".py") for r in rows if r["kind"] == "source")
    # A clean document is a piece of its (text) file at a multiple of doc_bytes.
    candidates = list_package_files()
    paths = {f.source: f.path for f in candidates}
    for r in rows:
        data = Path(paths[r["source"]]).read_bytes()
        assert b"\0" not in data and data.decode("utf-8")
        if r["corruption"] == "clean":
            pieces = {data[i : i + 256] for i in range(0, len(data) - 255, 256)}
            assert r["text"].encode("latin-1") in pieces, r["source"]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["file_list_hash"] == file_list_hash(candidates)
    # Built again elsewhere: the same bytes. Asked again: the cached file, not rebuilt.
    again = prepare_corpus(TextDataRaterConfig(cache_dir=str(tmp_path / "b"), **PACKAGES_SMALL))
    assert again.name == path.name and again.read_bytes() == path.read_bytes()
    stamp = path.stat().st_mtime_ns
    assert prepare_corpus(cfg) == path and path.stat().st_mtime_ns == stamp
    # The stdlib corpus of the same settings is another file.
    assert prepare_corpus(cfg.model_copy(update={"corpus": "stdlib", "max_files": 3})).name.startswith("stdlib_")


def test_packages_corpus_one_iteration_reports_the_corpus(tmp_path):
    import json

    from algorithms.tasks.datarater_text import KINDS, TextDataRater, TextDataRaterConfig

    torch.set_num_threads(1)
    task = TextDataRater(TextDataRaterConfig(cache_dir=str(tmp_path), **PACKAGES_SMALL), seed=0,
                         artifact_dir=tmp_path)
    m = task.train()
    assert 4.0 < m["meta/outer_loss"] < 6.0
    n = m["meta/corpus/docs"]
    assert n == sum(m[f"meta/corpus/docs/{k}"] for k in KINDS) == sum(
        m[f"meta/corpus/docs/{s}"] for s in ("train", "outer", "heldout"))
    assert all(m[f"meta/corpus/docs/{k}"] > 0 for k in KINDS)
    assert m["meta/corpus/bytes"] == 256 * n
    assert m["meta/corpus/corrupted_docs"] == round(0.5 * m["meta/corpus/docs/train"])
    manifest = json.loads((tmp_path / "corpus.json").read_text())
    assert m["meta/corpus/file_list_hash"] == int(manifest["file_list_hash"], 16)
    assert len(manifest["sources"]) == m["meta/corpus/files"]
    assert task.train()["meta/corpus/docs"] == n  # reported with every result


def test_corpus_setting_error_names_the_key_and_values():
    from orchestration.spec import SpecError, load_spec

    with pytest.raises(SpecError) as e:
        load_spec({"name": "t", "task": "datarater_text", "config": {"corpus": "pypi"}})
    text = str(e.value)
    assert e.value.key == "config.corpus" and "\n" not in text
    assert "'pypi'" in text and "stdlib" in text and "packages" in text
