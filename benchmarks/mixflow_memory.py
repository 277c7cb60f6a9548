"""Peak memory and wall time of one meta-gradient step for each engine (reverse, reverse_remat, mixflow,
mixflow_remat), each measurement in its own subprocess.

    python benchmarks/mixflow_memory.py                       # the full grid, skipping measured rows
    python benchmarks/mixflow_memory.py --models lm --T 8     # a subset
    python benchmarks/mixflow_memory.py --one '{"model": "lm", "T": 8, "engine": "mixflow"}'

Problem: the DataRater objective (algorithms/datarater/objective.py): an inner model trained for T
steps on batches weighted by softmax(rater scores) over the batch, outer loss on a held-out batch,
meta-gradient w.r.t. the rater parameters. float32, CPU, inner optimiser SGD (``--opt adam`` too).

Models (moderate sizes for a shared 2-core machine):
- ``mlp``: 3x512 tanh MLP on 64 inputs, 10 classes, batch 256; rater MLP 74->64->1.
- ``lm``: byte-level causal transformer, d_model 128, 4 heads, 2 layers, d_ff 512, sequence 64,
  batch 8 (512 tokens); rater: non-causal byte transformer d_model 32, 1 layer, mean-pooled score.
- ``lm_tokens``: the same LM on batch 32 x sequence 128 (4096 tokens per batch): activations dominate
  parameters, as in LM training at scale (measured at T = 8 only, to fit the time budget).

Memory: ``peak_live_bytes`` is the peak of the allocator's live bytes during the meta-gradient step,
relative to the live bytes just before it (inputs, parameters and batches already allocated are the
baseline). It is computed from torch.profiler's allocation events (``profile_memory=True``: one
``[memory]`` event per c10 CPU allocation (+bytes) and free (−bytes)), as the maximum of their
running sum in time order. This sees the bytes tensors actually hold, unlike process RSS, which keeps
freed pages (``rss_delta_bytes``, from ru_maxrss, is reported too for comparison). Time: wall time of
one step without the profiler (min over ``reps`` runs after one warm-up step), and the process CPU
time of the same step (``cpu_time_s``; all runs use one torch thread), which is less disturbed by
other load on a shared machine than wall time.

``microbatch``: examples per chunk in the MixFlow engines' gradient and JVP and in every engine's
outer gradient (0: whole batch; the grid measures MixFlow both ways).

Where MixFlow-MG's memory and time go (measured with this script and saved-tensor hooks; see the
results file and ``--summary``):
- Saved per inner step: only θ_t and the batch reference (tests/test_meta_engines.py asserts it with
  saved-tensor hooks); plain ``mixflow`` also keeps the rater's small graph (η ↦ softmax weights) and,
  for Adam, the optimiser's elementwise intermediates; ``mixflow_remat`` keeps only (θ_t, s_t).
- The large "constant" is the transient of the JVP of the gradient in the backward pass: it holds the
  primal and tangent activations of one inner forward/backward (~1.7x the whole double-backward graph
  that reverse keeps per step, here), plus ~10-15 parameter-sized tensors (parameters, tangents,
  gradients, their tangents, accumulators). Microbatching the JVP (the weighted inner loss is a sum over
  examples; ``WeightedInnerLoss``) divides the activation part by the number of chunks; the
  parameter-sized part remains, so the ratio to reverse is bounded by (per-step activations of reverse
  x T) / (that part) and grows with tokens per batch and with T.
- The outer loss's activations were a second constant (they were kept until the backward); the outer
  gradient is now taken eagerly on a detached θ_T and in microbatches, for every engine.
- Time (``--profile``: CPU time of each piece of one inner step on one batch, rows in
  results/mixflow_profile.jsonl). Per inner step, ``reverse`` costs the gradient with create_graph
  (``ror_forward``) plus the VJP of that graph (``ror_backward``); MixFlow costs the plain gradient in
  its forward (``grad``) plus the JVP of the gradient in its backward (``jvp_func``), whose primal
  pass recomputes the inner forward and backward. Session s2 (load average 9-14 on 2 cores; CPU
  seconds), lm_tokens in chunks of 4 sequences: grad 0.39, jvp_func 1.27 (jvp_forward_ad 1.25, so
  torch.func itself is not the cost), ror_forward 0.32, ror_backward 0.82, a recompute plus double
  backward 1.21; per step reverse 1.13 vs MixFlow 1.66 (1.46x; the full T = 8 step: 15.6 vs 10.5 s,
  1.48x). The tangent part of the JVP (~0.9) costs about what reverse's double backward costs; the
  excess is the recomputation (one more inner forward+backward per step, 0.39) that saving only
  inputs requires, and ``aten::mm`` is 46% of the JVP's self time: the work is compute-bound. So on a
  CPU, where ``reverse`` is limited by FLOPs and not by memory traffic, no eager engine that saves
  only its inputs can reach <= 1.0x reverse: the floor is about (3F + 3F + 4F) / (3F + 4F) ~ 1.4x
  with F one forward pass. In JAX on accelerators the reverse-over-reverse baseline is bound by memory
  traffic and XLA fuses the primal and tangent passes; eager PyTorch on CPU has neither.
  ``torch.compile`` of the chunk gradient and JVP (``--compile``) is that fusion on CPU: 1.05x
  (session s5 below), while reverse's ``create_graph`` double backward stays eager.
- Small chunks are what is fixable: at ``lm`` (8 x 64 tokens) in chunks of 2 sequences the
  per-op cost of many small calls (``_has_same_storage_numel``, ``alias``, ``view``, ``copy_``: 11% of
  the JVP's self time in ~4,300 calls) makes the JVP 2.5x slower than on the whole batch (0.34 vs
  0.14 s; the whole-batch double backward route: 0.12 s), while a
  recompute plus double backward of the same chunks costs 0.21 s. ``WeightedInnerLoss(hvp="reverse")``
  (``--hvp reverse``) gets the same products that way from the same saved inputs; larger chunks
  (``--microbatch``) trade memory for time.

Re-measured (session "s2", 2026-11-26, CPU seconds of one step, load average 3-43 on 2 cores, so
wall time is not meaningful; memory is the allocator's peak, independent of load):
- lm_tokens T = 8 (4096 tokens, SGD): reverse 1810 MB / 10.5 s; mixflow 170 MB (10.6x less) / 15.6 s
  (1.48x); mixflow_remat 94 MB (19.2x less) / 18.5 s (1.76x). The >= 10x memory goal holds here.
- lm T = 8 (512 tokens, SGD): reverse 212 MB / 1.41 s; mixflow 49 MB (4.4x) / 3.10 s (2.2x);
  mixflow_remat 43 MB (5.0x) / 3.91 s (2.8x). With so few tokens the per-step parameter-sized tensors
  and the JVP transient are a large share, and the chunks of 2 sequences pay per-op costs.
- lm T = 8 with an Adam inner optimiser: reverse 287 MB / 1.70 s; mixflow 122 MB (2.4x) / 3.12 s
  (1.84x); mixflow_remat 84 MB (3.4x) / 4.14 s (2.4x) (Adam's elementwise intermediates are saved
  per step by plain mixflow; mixflow_remat drops them).
- lm_tokens T = 32 (load 3-9): reverse 7004 MB / 46.5 s; mixflow 483 MB (14.5x less) / 68.4 s (1.47x;
  it keeps the rater's small graph per step, ~13 MB here); mixflow_remat 140 MB (49.9x less) / 74.8 s
  (1.61x).
- ``--hvp reverse`` (the MixFlow backward's products by recompute plus double backward, load ~4):
  lm T = 8 mixflow 42 MB (5.0x) / 2.33 s (1.66x, from 2.2x), mixflow_remat 36 MB (5.9x) / 2.57 s;
  lm_tokens T = 8 mixflow 150 MB (12.1x) / 14.0 s (1.33x, from 1.48x). The reverse rows these
  ratios divide by were measured at load 12-43. Session "s3" repeats the T = 8 rows back to back at
  load 4-7: lm reverse 1.39 s, mixflow 3.56 s (2.57x), mixflow hvp=reverse 2.87 s (2.07x);
  lm_tokens reverse 9.72 s, mixflow 14.75 s (1.52x), mixflow hvp=reverse 12.34 s (1.27x) at 150 MB
  (12.1x less than reverse's 1810 MB). Repeat CPU times of one configuration differ by up to ~15%.

Session "s5" (2026-12-08, AMD EPYC, load 1-3, ``--reps 3``: min over three timed steps): with one
timed step (``--reps 1``, all rows above) the reverse engine's step is the first to touch its 1.8 GB
of graph, and the page faults of that fresh memory are CPU time too (s4, same machine, reps 1:
reverse 11.6 s; reps 2-3: 5.3-5.8 s); from the second step on the allocator reuses the pages, which
is the steady state of a meta-training loop, so s5 reports the min over reps. lm_tokens T = 8:
reverse 1810 MB / 5.34 s; mixflow 168 MB / 9.01 s (1.69x); mixflow ``--hvp reverse`` 150 MB / 7.33 s
(1.37x); mixflow ``--compile`` (``WeightedInnerLoss(compile=True)``: the chunk gradient and the chunk
JVP as ``torch.compile``d torch.func functions) 150 MB (12.0x less) / 5.58 s (1.05x; repeat pair
s5b: reverse 5.74 s, mixflow ``--compile`` 5.80 s, 1.01x). Per chunk of 4
sequences (tools outside this script, load ~2): gradient 0.21 s eager / 0.18 s compiled, JVP 0.84 s
eager / 0.49 s compiled (inductor fuses the primal and tangent passes' elementwise work and drops the
primal gradient's weight products, which the JVP does not need), recompute + double backward 0.71 s.
Compilation is paid once, in the warm-up step: 10.8 CPU s / 19.9 s wall with inductor's on-disk
cache of an earlier run, 30 CPU s / ~2 min wall cold at load ~3 (``warmup_cpu_s``,
``warmup_time_s``); at ~3.4 s saved per T = 8 meta-step against eager mixflow it amortises after
about ten meta-steps. lm_tokens T = 32 (``--reps 2``): reverse 7004 MB / 21.22 s, mixflow ``--compile``
463 MB (15.1x less) / 21.57 s (1.02x).

One JSON line per (model, T, engine, opt) is printed as it is measured and appended to
benchmarks/results/mixflow_memory.jsonl; configurations already in that file are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mixflow_memory.jsonl"
ENGINES = ("reverse", "reverse_remat", "mixflow", "mixflow_remat")


def build_problem(model: str, seed: int = 0, microbatch: int | None = None):
    import torch
    from torch import nn

    from algorithms.datarater.models import (
        MLP,
        ByteTransformer,
        classification_per_example_loss,
        lm_per_example_loss,
    )
    from algorithms.datarater.objective import Batch, make_inner_loss, make_outer_loss
    from algorithms.meta import param_tuple
    from algorithms.meta.functional import functional

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if model == "mlp":
        net, rater = MLP(64, (512, 512, 512), 10, "tanh"), MLP(74, (64,), 1, "tanh")
        f_net, f_rater = functional(net), functional(rater)

        def batch():
            x = torch.randn(256, 64, generator=g)
            y = torch.randint(0, 10, (256,), generator=g)
            return Batch(x, y, torch.cat([x, nn.functional.one_hot(y, 10).float()], 1))

        inner = make_inner_loss(f_net, lambda m, r: f_rater(m, r).squeeze(-1), classification_per_example_loss,
                                microbatch)
        outer = make_outer_loss(f_net, classification_per_example_loss, microbatch)
    elif model in ("lm", "lm_tokens"):
        n_seq, seq_len = (8, 64) if model == "lm" else (32, 128)
        net = ByteTransformer(d_model=128, n_heads=4, n_layers=2, d_ff=512, max_len=seq_len)
        rater = ByteTransformer(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=seq_len, causal=False,
                                pooled_score=True)

        def batch():
            t = torch.randint(0, 256, (n_seq, seq_len), generator=g)
            return Batch(t, t, t)

        inner = make_inner_loss(functional(net), functional(rater), lm_per_example_loss, microbatch)
        outer = make_outer_loss(functional(net), lm_per_example_loss, microbatch)
    else:
        raise ValueError(f"model={model!r}: allowed values are 'mlp', 'lm', 'lm_tokens'")
    return inner, outer, param_tuple(net), param_tuple(rater), batch


def peak_from_profile(prof) -> int:
    """max over time of Σ (allocated − freed) bytes, from the profiler's [memory] events."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure_one(cfg: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from algorithms.meta import make_inner_optimizer, meta_gradient
    from algorithms.meta.functional import tensor_bytes

    torch.set_num_threads(cfg.get("threads", 1))
    inner, outer, theta, eta, batch = build_problem(cfg["model"], microbatch=cfg.get("microbatch") or None)
    if cfg.get("hvp") or cfg.get("compile"):
        import dataclasses

        inner = dataclasses.replace(inner, hvp=cfg.get("hvp") or "forward", compile=bool(cfg.get("compile")))
    opt = make_inner_optimizer(cfg["opt"], 0.1 if cfg["opt"] == "sgd" else 1e-3)
    T = cfg["T"]
    batches, out_batch = [batch() for _ in range(T)], batch()
    state = opt.init(theta)

    def step(bs):
        return meta_gradient(inner, outer, opt, theta, state, eta, bs, out_batch, cfg["engine"])

    # Warm-up: first-call costs (dispatcher, torch.func setup, torch.compile's compilation) out of the
    # timing; its own CPU and wall time are reported (warmup_cpu_s, warmup_time_s).
    t0, c0 = time.perf_counter(), time.process_time()
    step(batches[:1])
    warmup = (time.perf_counter() - t0, time.process_time() - c0)
    load_before = os.getloadavg()[0]
    times, cpu_times = [], []
    for _ in range(cfg.get("reps", 1)):
        t0, c0 = time.perf_counter(), time.process_time()
        r = step(batches)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    del r
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batches)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **cfg,
        "peak_live_bytes": peak_from_profile(prof),
        "rss_delta_bytes": (rss1 - rss0) * 1024,
        "time_s": min(times),
        "cpu_time_s": min(cpu_times),
        "warmup_time_s": warmup[0],
        "warmup_cpu_s": warmup[1],
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "param_bytes": tensor_bytes(theta),
        "rater_param_bytes": tensor_bytes(eta),
        "torch": torch.__version__,
    }


def profile_components(cfg: dict) -> dict:
    """CPU time of the pieces of one inner step's meta-gradient work, MixFlow-MG vs reverse-over-reverse.

    On one batch, in the engines' chunks of ``microbatch`` examples, with weights w = softmax(φ_η) and a
    random cotangent v (|θ|-shaped), each piece timed as the min over ``reps`` of process CPU time:
    - ``grad``: g = Σ_i w_i ∇ℓ_i (the MixFlow forward; also SGD's plain gradient);
    - ``jvp_func``: torch.func.jvp of θ ↦ (g, ℓ) in direction v (the MixFlow backward: primal g again
      plus its tangent ∇²L·v and ∇ℓ·v);
    - ``jvp_forward_ad``: the same JVP with ``torch.autograd.forward_ad`` dual tensors through
      ``autograd.grad(create_graph=True)`` (no torch.func transforms);
    - ``ror_forward``: g with ``create_graph=True`` (the reverse engine's forward of one step);
    - ``ror_backward``: the VJP of that graph, vᵀ∂g/∂(θ, w) (the reverse engine's backward of one step);
    - ``hvp_reverse_recompute``: ror_forward + ror_backward from the saved inputs (what a backward that
      recomputes and double-backpropagates would cost: reverse_remat's per-step backward).
    Per step, reverse costs ror_forward + ror_backward; MixFlow costs grad + jvp_func. Also the top ops
    of jvp_func by self CPU time (torch.profiler).
    """
    import torch
    from torch.autograd import forward_ad
    from torch.profiler import ProfilerActivity, profile

    from algorithms.meta.engines import _chunks, slice_batch

    torch.set_num_threads(cfg.get("threads", 1))
    inner, _, theta, eta, batch_fn = build_problem(cfg["model"], microbatch=cfg.get("microbatch") or None)
    b = batch_fn()
    with torch.no_grad():
        w = inner.weights(eta, b)
    g = torch.Generator().manual_seed(1)
    v = tuple(torch.randn(t.shape, generator=g) * 1e-2 for t in theta)
    chunks = [(slice_batch(b, a, e), w[a:e]) for a, e in _chunks(w.shape[0], inner.microbatch)]

    def grad_only():
        for chunk, w_c in chunks:
            p = tuple(t.detach().requires_grad_() for t in theta)
            with torch.enable_grad():
                torch.autograd.grad((w_c * inner.per_example_loss(p, chunk)).sum(), p)

    def jvp_func():
        for chunk, w_c in chunks:
            def weighted(p, chunk=chunk, w_c=w_c):
                losses = inner.per_example_loss(p, chunk)
                return (w_c * losses).sum(), losses
            torch.func.jvp(lambda p, f=weighted: torch.func.grad(f, has_aux=True)(p), (theta,), (v,))

    def jvp_forward_ad():
        for chunk, w_c in chunks:
            with forward_ad.dual_level(), torch.enable_grad():
                p = tuple(forward_ad.make_dual(t.detach(), d).requires_grad_() for t, d in zip(theta, v, strict=True))
                losses = inner.per_example_loss(p, chunk)
                gs = torch.autograd.grad((w_c * losses).sum(), p, create_graph=True)
                _ = [forward_ad.unpack_dual(x).tangent for x in (*gs, losses)]

    graphs: list = []

    def ror_forward():
        graphs.clear()
        for chunk, w_c in chunks:
            p = tuple(t.detach().requires_grad_() for t in theta)
            wc = w_c.detach().requires_grad_()
            with torch.enable_grad():
                gs = torch.autograd.grad((wc * inner.per_example_loss(p, chunk)).sum(), p, create_graph=True)
            graphs.append((gs, p, wc))

    def ror_backward():
        for gs, p, wc in graphs:
            torch.autograd.grad(gs, (*p, wc), v, allow_unused=True)

    def hvp_reverse_recompute():
        ror_forward()
        ror_backward()

    def cpu(fn, reps=cfg.get("reps", 3), setup=None):
        best = float("inf")
        for _ in range(reps + 1):  # the first call is a warm-up
            if setup:
                setup()
            c0 = time.process_time()
            fn()
            best = min(best, time.process_time() - c0)
        return best

    out = {**cfg, "load_avg_1min_start": round(os.getloadavg()[0], 2)}
    out["grad_s"] = cpu(grad_only)
    out["jvp_func_s"] = cpu(jvp_func)
    out["jvp_forward_ad_s"] = cpu(jvp_forward_ad)
    out["ror_forward_s"] = cpu(ror_forward)
    out["ror_backward_s"] = cpu(ror_backward, setup=ror_forward)
    out["hvp_reverse_recompute_s"] = cpu(hvp_reverse_recompute)
    out["per_step_reverse_s"] = out["ror_forward_s"] + out["ror_backward_s"]
    out["per_step_mixflow_s"] = out["grad_s"] + out["jvp_func_s"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        jvp_func()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev)
    out["jvp_func_top_ops"] = [[e.key, e.count, round(e.self_cpu_time_total / total, 3)] for e in ev[:15]]
    out["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    out["torch"] = torch.__version__
    return out


MICROBATCH = {"mlp": 64, "lm": 2, "lm_tokens": 4}
"""Examples per chunk for the MixFlow JVP and the outer gradient (0 = whole batch)."""


def key(cfg: dict) -> tuple:
    """A measured row's identity; ``session`` tells re-measurements apart (None for the first ones)."""
    return (cfg["model"], cfg["T"], cfg["engine"], cfg["opt"], cfg["microbatch"], cfg.get("session"),
            cfg.get("hvp", "forward"), bool(cfg.get("compile")))


def summary(path: Path) -> list[dict]:
    """Per measured row: memory and CPU-time ratios against ``reverse`` at the same (model, T, opt)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ref = {(r["model"], r["T"], r["opt"], r.get("session")): r for r in rows
           if r["engine"] == "reverse" and "error" not in r}
    out = []
    for r in rows:
        base = ref.get((r["model"], r["T"], r["opt"], r.get("session")))
        if base is None or "error" in r:
            continue
        out.append({
            "model": r["model"], "T": r["T"], "opt": r["opt"], "engine": r["engine"], "microbatch": r["microbatch"],
            "session": r.get("session"), "hvp": r.get("hvp", "forward"), "compile": bool(r.get("compile")),
            "cpu_time_s": round(r["cpu_time_s"], 2),
            "peak_MB": round(r["peak_live_bytes"] / 1e6, 1),
            "memory_saving_vs_reverse": round(base["peak_live_bytes"] / r["peak_live_bytes"], 2),
            "cpu_time_vs_reverse": round(r["cpu_time_s"] / base["cpu_time_s"], 2),
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help="measure one JSON config in this process and print its result")
    ap.add_argument("--models", nargs="+", default=["lm", "mlp"])
    ap.add_argument("--T", nargs="+", type=int, default=[2, 4, 8, 32])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES))
    ap.add_argument("--opt", nargs="+", default=["sgd"])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--whole-batch-T", nargs="*", type=int, default=[8],
                    help="T values at which MixFlow is also measured without microbatching")
    ap.add_argument("--session", default=None,
                    help="tag of a re-measurement (rows with another tag, or none, are not skipped)")
    ap.add_argument("--microbatch", type=int, default=None, help="override the model's default chunk size")
    ap.add_argument("--no-whole-batch", action="store_true")
    ap.add_argument("--hvp", choices=["forward", "reverse"], default=None,
                    help="MixFlow backward products: forward-over-reverse (default) or reverse-over-reverse")
    ap.add_argument("--compile", action="store_true",
                    help="MixFlow engines: WeightedInnerLoss(compile=True) (torch.compile'd chunk gradient and JVP)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--profile", help="JSON config (model, microbatch, reps): CPU time per component of one "
                    "inner step (profile_components); appended to benchmarks/results/mixflow_profile.jsonl")
    ap.add_argument("--summary", action="store_true", help="print ratios against reverse from the results file")
    args = ap.parse_args()
    if args.summary:
        for row in summary(args.out):
            print(json.dumps(row))
        return
    if args.profile:
        line = json.dumps(profile_components(json.loads(args.profile)))
        print(line, flush=True)
        with (RESULTS.parent / "mixflow_profile.jsonl").open("a") as f:
            f.write(line + "\n")
        return
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))), flush=True)
        return
    done = set()
    if args.out.exists():
        done = {key(json.loads(line)) for line in args.out.read_text().splitlines() if line.strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for T in args.T:
            for opt in args.opt:
                mb = MICROBATCH[model] if args.microbatch is None else args.microbatch
                runs = [(e, mb) for e in args.engines]
                # MixFlow on the whole batch too, to show what microbatching the JVP buys.
                if T in args.whole_batch_T and not args.no_whole_batch:
                    runs += [(e, 0) for e in args.engines if e.startswith("mixflow")]
                for engine, microbatch in runs:
                    cfg = {"model": model, "T": T, "engine": engine, "opt": opt, "microbatch": microbatch,
                           "reps": args.reps}
                    if args.session:
                        cfg["session"] = args.session
                    if args.hvp and engine.startswith("mixflow"):
                        cfg["hvp"] = args.hvp
                    if args.compile and engine.startswith("mixflow"):
                        cfg["compile"] = True
                    if key(cfg) in done:
                        continue
                    proc = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(cfg)], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                    )
                    if proc.returncode != 0:
                        print(json.dumps({**cfg, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
                        continue
                    line = proc.stdout.strip().splitlines()[-1]
                    print(line, flush=True)
                    with args.out.open("a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
