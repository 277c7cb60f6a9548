"""DataRater on a byte-level language model trained on the Python standard library's own source.

Corpus (offline, no downloads): the ``.py`` files directly under ``sysconfig.get_paths()["stdlib"]``,
sorted by name, cut into documents of ``doc_bytes`` bytes. Documents are split (fixed by
``data_seed``) into ``train`` (the pool the rater scores), ``outer`` (clean held-out data for the outer
loss) and ``heldout`` (clean, for the evaluation). A fraction ``corrupt_fraction`` of the train
documents is replaced, in equal shares, by one of:
- ``random_bytes``: uniformly random bytes;
- ``shuffled_tokens``: the document's whitespace-separated tokens in random order;
- ``repeated_lines``: one line of the document repeated to the document's length;
- ``base64_blob``: the base64 encoding of the document (an encoded blob).

The prepared corpus is a Parquet file (pyarrow) with columns ``text`` (the document's bytes decoded as
latin-1, so every byte maps to one character and back), ``source`` (file path relative to the stdlib),
``corruption`` (``clean`` or the corruption name) and ``split``; it is cached under ``cache_dir``.

Examples are windows of ``seq_len`` bytes from a document; the LM is a small causal byte transformer
(math attention), the rater a non-causal byte transformer with a mean-pooled score (d_model 32, one
layer: its forward on one window is ~4% of the FLOPs of one LM training step per example at the
default sizes, so scoring every candidate of every step is cheap next to training).

Share of corruption. The default ``corrupt_fraction`` is 0.5: raw web crawls are at least this noisy
(heuristic pipelines for C4 or RefinedWeb keep well under half of the raw pages), and the DataRater
paper's best discard fractions on its noisiest data reach 75%. Measured here with an *oracle* filter
(train only on the clean documents; LM d_model 64, 2 layers, batch 32, Adam 3e-3, seed 1), the steps
to reach the unfiltered model's final held-out loss are 22% fewer at S = 400 and 29% fewer at
S = 1000 with half of the documents corrupted, but only ~10-12% fewer with 30% corrupted: at these
budgets the LM is limited by optimisation steps more than by data, and corrupted windows only dilute
its gradient. The oracle bounds what any rater can save, so the evaluation uses 0.5.

Evaluation protocol: see algorithms/tasks/datarater_common.py (fresh LMs on unfiltered vs batch-top-K
filtered windows for several ρ, paired seeds averaged, the step where the filtered curve first reaches
the unfiltered final held-out loss, FLOPs with the rater's inference and, separately, meta-training
counted, and the break-even number of trainings).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from algorithms.datarater.models import ByteTransformer, lm_per_example_loss
from algorithms.datarater.objective import Batch
from algorithms.tasks.datarater_common import DataRaterTask, DataRaterTaskConfig

CORRUPTIONS = ("clean", "random_bytes", "shuffled_tokens", "repeated_lines", "base64_blob")


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "orchestra", "datarater")


class TextDataRaterConfig(DataRaterTaskConfig):
    cache_dir: str = Field(default_factory=default_cache_dir)
    """Where the prepared Parquet corpus is cached."""
    max_files: int = Field(120, ge=3)
    """Stdlib files used (the first ones in sorted order)."""
    doc_bytes: int = Field(512, ge=32)
    corrupt_fraction: float = Field(0.5, ge=0, lt=1)
    """Fraction of the train documents replaced by a corruption (equal shares of the four kinds)."""
    outer_fraction: float = Field(0.1, gt=0, lt=0.5)
    heldout_fraction: float = Field(0.1, gt=0, lt=0.5)
    data_seed: int = 0
    seq_len: int = Field(64, ge=8)
    d_model: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(2, ge=1)
    rater_d_model: int = Field(32, ge=4)
    rater_layers: int = Field(1, ge=1)
    score_examples: int = Field(512, ge=16)
    """Windows in the fixed scoring sample (AUROC, histograms)."""
    heldout_examples: int = Field(256, ge=16)
    """Windows in the fixed held-out evaluation set."""


def corrupt_document(text: bytes, kind: str, gen: torch.Generator) -> bytes:
    """One corrupted version of a document (same length, or base64 cut to the same length)."""
    n = len(text)
    if kind == "random_bytes":
        return bytes(torch.randint(0, 256, (n,), generator=gen).tolist())
    if kind == "shuffled_tokens":
        toks = text.split()
        order = torch.randperm(len(toks), generator=gen).tolist()
        return b" ".join(toks[i] for i in order)[:n].ljust(n, b" ")
    if kind == "repeated_lines":
        lines = [ln for ln in text.split(b"\n") if ln.strip()] or [text]
        line = lines[int(torch.randint(0, len(lines), (1,), generator=gen))] + b"\n"
        return (line * (n // len(line) + 1))[:n]
    if kind == "base64_blob":
        return (base64.b64encode(text) * 2)[:n]
    raise ValueError(f"corruption kind={kind!r}: allowed values are {', '.join(CORRUPTIONS[1:])}")


def prepare_corpus(c: TextDataRaterConfig) -> Path:
    """Build (or reuse) the Parquet corpus described in the module docstring; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    params = {k: getattr(c, k) for k in ("max_files", "doc_bytes", "corrupt_fraction", "outer_fraction",
                                         "heldout_fraction", "data_seed")}
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(c.cache_dir) / f"stdlib_corpus_{tag}.parquet"
    if path.exists():
        return path
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[: c.max_files]
    docs: list[tuple[bytes, str]] = []
    for f in files:
        data = f.read_bytes()
        for i in range(0, len(data) - c.doc_bytes + 1, c.doc_bytes):
            docs.append((data[i : i + c.doc_bytes], str(f.relative_to(root))))
    g = torch.Generator().manual_seed(c.data_seed)
    perm = torch.randperm(len(docs), generator=g).tolist()
    n_out, n_held = int(c.outer_fraction * len(docs)), int(c.heldout_fraction * len(docs))
    split = {}
    for j, i in enumerate(perm):
        split[i] = "outer" if j < n_out else "heldout" if j < n_out + n_held else "train"
    train_ids = [i for i in perm if split[i] == "train"]
    n_bad = int(round(c.corrupt_fraction * len(train_ids)))
    kinds = {i: CORRUPTIONS[1 + k % (len(CORRUPTIONS) - 1)] for k, i in enumerate(train_ids[:n_bad])}
    texts, sources, labels, splits = [], [], [], []
    for i, (text, src) in enumerate(docs):
        kind = kinds.get(i, "clean")
        if kind != "clean":
            text = corrupt_document(text, kind, g)
        texts.append(text.decode("latin-1"))
        sources.append(src)
        labels.append(kind)
        splits.append(split[i])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(pa.table({"text": texts, "source": sources, "corruption": labels, "split": splits}), tmp)
    os.replace(tmp, path)  # atomic: parallel trials may prepare the same corpus
    return path


def load_corpus(path: Path) -> dict[str, object]:
    import pyarrow.parquet as pq

    t = pq.read_table(path).to_pydict()
    out: dict[str, object] = {}
    for split in ("train", "outer", "heldout"):
        idx = [i for i, s in enumerate(t["split"]) if s == split]
        out[split] = torch.stack([torch.tensor(list(t["text"][i].encode("latin-1")), dtype=torch.long) for i in idx])
        out[split + "_code"] = torch.tensor([CORRUPTIONS.index(t["corruption"][i]) for i in idx])
    return out


@dataclass
class TextProblem:
    """RaterProblem for the byte LM (picklable). Documents are [n_docs, doc_bytes] byte tensors."""

    train_docs: Tensor
    outer_docs: Tensor
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    rater_d_model: int
    rater_layers: int

    def make_inner_model(self) -> nn.Module:
        return ByteTransformer(self.d_model, self.n_heads, self.n_layers, 2 * self.d_model, self.seq_len)

    def make_rater(self) -> nn.Module:
        return ByteTransformer(self.rater_d_model, 1, self.rater_layers, 2 * self.rater_d_model, self.seq_len,
                               causal=False, pooled_score=True)

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return lm_per_example_loss(output, target)

    def windows(self, docs: Tensor, gen: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        d = torch.randint(0, docs.shape[0], (n,), generator=gen)
        o = torch.randint(0, docs.shape[1] - self.seq_len + 1, (n,), generator=gen)
        return docs[d[:, None], o[:, None] + torch.arange(self.seq_len)], d

    def sample_train(self, gen: torch.Generator, n: int) -> Batch:
        t, _ = self.windows(self.train_docs, gen, n)
        return Batch(t, t, t)

    def sample_outer(self, gen: torch.Generator, n: int) -> Batch:
        t, _ = self.windows(self.outer_docs, gen, n)
        return Batch(t, t, t)


class TextDataRater(DataRaterTask):
    Config = TextDataRaterConfig
    corruption_names = CORRUPTIONS

    def build_problem(self) -> TextProblem:
        c = self.config
        self.corpus = load_corpus(prepare_corpus(c))
        problem = TextProblem(self.corpus["train"], self.corpus["outer"], c.seq_len, c.d_model, c.n_layers,
                              c.n_heads, c.rater_d_model, c.rater_layers)
        g = torch.Generator().manual_seed(c.data_seed + 1)
        toks, d = problem.windows(self.corpus["train"], g, c.score_examples)
        self._score = (Batch(toks, toks, toks), self.corpus["train_code"][d])
        held, _ = problem.windows(self.corpus["heldout"], g, c.heldout_examples)
        self._heldout = Batch(held, held, held)
        return problem

    def scoring_set(self) -> tuple[Batch, Tensor]:
        return self._score

    def heldout_set(self) -> Batch:
        return self._heldout

    def probe_inputs(self, n: int) -> Tensor:
        return self._score[0].r[:n]
