"""DataRater on a byte-level language model trained on text that ships with the Python installation.

Corpora (offline, no downloads; ``corpus``):
- ``stdlib`` (default): the ``.py`` files directly under ``sysconfig.get_paths()["stdlib"]``, sorted by
  name, the first ``max_files`` of them.
- ``packages``: the text files of the standard library and of the interpreter's site-packages
  (``sysconfig`` ``purelib`` and ``platlib``), of three kinds: ``source`` (``.py``), ``docs``
  (``.md``, ``.rst``, ``.txt``, and the ``METADATA`` / ``DESCRIPTION`` / ``PKG-INFO`` files of
  ``*.dist-info`` / ``*.egg-info``) and ``licence`` (``LICENSE*``, ``LICENCE*``, ``COPYING*``,
  ``NOTICE*``, and every file under ``*.dist-info/licenses/``). Skipped: ``__pycache__`` and any
  ``site-packages`` / ``dist-packages`` directory inside the stdlib (the interpreter's own site
  directories are roots of their own), this project's packages (``algorithms``, ``orchestration``, the
  ``orchestra_rl`` dist-info) and its editable-install finder files (``__editable__*``), packaging
  records (``top_level.txt``, ``entry_points.txt``, ...), docs-suffixed files under a ``test(s)``,
  ``testing``, ``testdata``, ``data`` or ``build`` directory (number tables, not prose), files shorter
  than ``doc_bytes``, files with a NUL byte or that are not valid UTF-8 (binary-looking), and exact
  duplicates (same bytes as a file taken before: the many copies of one licence text). Selection under the budget ``max_bytes`` (total
  document bytes; None: everything): each kind's files are taken in the order of the SHA-1 of their
  path (a deterministic spread over packages, not the alphabetically first ones), and the next file
  always comes from the kind with the fewest bytes so far, so the kinds share the budget equally until
  one runs out; the last file is cut to fit. The chosen files are then used in sorted path order.
  This corpus depends on the installed packages: the SHA-1 of the candidate file list (paths relative
  to their root, prefixed ``stdlib/`` or ``site-packages/``, with their sizes) is part of the cache key,
  so a changed environment builds a new file, and it is logged (``meta/corpus/file_list_hash``, the
  first 12 hex digits as an integer; ``corpus.json`` in the trial's artifacts; stdout).

Files are cut into documents of ``doc_bytes`` bytes (a file's tail shorter than that is dropped).
Documents are split (fixed by ``data_seed``) into ``train`` (the pool the rater scores), ``outer``
(clean held-out data for the outer loss) and ``heldout`` (clean, for the evaluation). A fraction
``corrupt_fraction`` of the train documents is replaced, in equal shares, by one of:
- ``random_bytes``: uniformly random bytes;
- ``shuffled_tokens``: the document's whitespace-separated tokens in random order;
- ``repeated_lines``: one line of the document repeated to the document's length;
- ``base64_blob``: the base64 encoding of the document (an encoded blob).

The prepared corpus is a Parquet file (pyarrow) with columns ``text`` (the document's bytes decoded as
latin-1, so every byte maps to one character and back), ``source`` (file path relative to its root; for
``packages`` prefixed ``stdlib/`` or ``site-packages/``), ``kind`` (``packages`` only: source, docs or
licence), ``corruption`` (``clean`` or the corruption name) and ``split``; it is cached under
``cache_dir``. Measured sizes of the ``packages`` corpus are in docs/methods.md (DataRater).

The corpus facts are reported with every result: ``meta/corpus/docs`` and ``meta/corpus/docs/<split>``,
``meta/corpus/docs/<kind>``, ``meta/corpus/corrupted_docs``, ``meta/corpus/bytes``,
``meta/corpus/files`` (and ``meta/corpus/file_list_hash`` for ``packages``).

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from algorithms.datarater.models import ByteTransformer, lm_per_example_loss
from algorithms.datarater.objective import Batch
from algorithms.tasks.datarater_common import DataRaterTask, DataRaterTaskConfig

CORRUPTIONS = ("clean", "random_bytes", "shuffled_tokens", "repeated_lines", "base64_blob")
KINDS = ("source", "docs", "licence")
SPLITS = ("train", "outer", "heldout")
# This project's own top-level packages and distribution (pyproject.toml): never part of the corpus.
PROJECT_PACKAGES = ("algorithms", "orchestration")
PROJECT_DISTRIBUTION = "orchestra_rl"
LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
DOCS_SUFFIXES = (".md", ".rst", ".txt")
DOCS_NAMES = ("METADATA", "DESCRIPTION", "PKG-INFO")
# Packaging records with a docs suffix: lists of names, not prose.
PACKAGING_RECORDS = frozenset({"top_level.txt", "entry_points.txt", "dependency_links.txt",
                               "namespace_packages.txt", "SOURCES.txt", "requires.txt", "not-zip-safe"})
# A docs-suffixed file under one of these directories is test data or a build output (number tables,
# profiler dumps), not prose.
DATA_DIRS = frozenset({"test", "tests", "testing", "testdata", "data", "build"})
# Bumped when the packages selection rules change, so an old cached file is not reused.
PACKAGES_FORMAT = 1


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "orchestra", "datarater")


class TextDataRaterConfig(DataRaterTaskConfig):
    cache_dir: str = Field(default_factory=default_cache_dir)
    """Where the prepared Parquet corpus is cached."""
    corpus: Literal["stdlib", "packages"] = "stdlib"
    """stdlib: the first max_files stdlib .py files; packages: source, docs and licences of the stdlib and
    site-packages, up to max_bytes (module docstring). The packages corpus depends on what is installed."""
    max_files: int = Field(120, ge=3)
    """Stdlib files used (the first ones in sorted order; corpus stdlib)."""
    max_bytes: int | None = Field(16_000_000, ge=1)
    """Total document bytes of the packages corpus (None: every eligible file)."""
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


# --- the packages corpus: candidate files, their kinds, the budgeted selection -----------------------------


@dataclass(frozen=True)
class CorpusFile:
    source: str
    """Path relative to its root, prefixed ``stdlib/`` or ``site-packages/`` (posix separators)."""
    path: str
    """Where the file is on this machine (not part of the corpus or its hash)."""
    kind: str
    size: int
    """Bytes on disk (part of the file-list hash)."""


def file_kind(dirs: tuple[str, ...], name: str) -> str | None:
    """source, docs, licence or None (not part of the corpus) for file ``name`` in directory ``dirs``
    (the directory's path relative to its root, as parts)."""
    in_dist_licenses = any(d.endswith(".dist-info") and i + 1 < len(dirs) and dirs[i + 1] == "licenses"
                           for i, d in enumerate(dirs))
    if in_dist_licenses or name.upper().startswith(LICENCE_PREFIXES):
        return "licence"
    if name in PACKAGING_RECORDS:
        return None
    if name.endswith(".py"):
        return "source"
    if DATA_DIRS.intersection(dirs):
        return None
    if name.endswith(DOCS_SUFFIXES) or (name in DOCS_NAMES and dirs and dirs[-1].endswith((".dist-info", ".egg-info"))):
        return "docs"
    return None


def package_roots() -> list[tuple[str, Path]]:
    """(prefix, directory): the stdlib, then the interpreter's purelib and platlib (once if equal)."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]).resolve())]
    for key in ("purelib", "platlib"):
        p = Path(paths[key]).resolve()
        if p.is_dir() and all(p != r for _, r in roots):
            roots.append(("site-packages", p))
    return roots


def _skip_top_level(prefix: str, name: str) -> bool:
    if prefix != "site-packages":
        return False
    return (name in PROJECT_PACKAGES or name.startswith("__editable__")
            or name.startswith(f"{PROJECT_DISTRIBUTION}-") and name.endswith((".dist-info", ".egg-info")))


def list_package_files(roots: list[tuple[str, Path]] | None = None) -> list[CorpusFile]:
    """Every candidate file of the packages corpus (by name and kind; contents not read yet), sorted by source."""
    out: dict[str, CorpusFile] = {}
    for prefix, root in roots if roots is not None else package_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirs = tuple(Path(dirpath).relative_to(root).parts)
            top = not dirs
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "site-packages", "dist-packages")
                           and not (top and _skip_top_level(prefix, d))]
            rel_dir = "".join(f"{d}/" for d in dirs)
            for name in filenames:
                kind = file_kind(dirs, name)
                if kind is None or (top and _skip_top_level(prefix, name)):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    size = os.stat(path).st_size
                except OSError:  # a dangling link
                    continue
                source = f"{prefix}/{rel_dir}{name}"
                out.setdefault(source, CorpusFile(source, path, kind, size))  # purelib and platlib may overlap
    return [out[s] for s in sorted(out)]


def file_list_hash(files: list[CorpusFile]) -> str:
    """SHA-1 (12 hex digits) of the candidate list: one ``source<TAB>size`` line per file, sorted."""
    return hashlib.sha1("".join(f"{f.source}\t{f.size}\n" for f in files).encode()).hexdigest()[:12]


def _readable_text(path: str) -> bytes | None:
    """The file's bytes if they look like text (no NUL byte, valid UTF-8), else None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if b"\0" in data:
            return None
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return data


def select_package_files(files: list[CorpusFile], doc_bytes: int, max_bytes: int | None) -> list[tuple[CorpusFile, bytes]]:
    """The budgeted selection of the module docstring: (file, bytes used: a multiple of doc_bytes), by source."""
    def order(f: CorpusFile) -> str:
        return hashlib.sha1(f.source.encode()).hexdigest()

    queues: dict[str, Iterator[CorpusFile]] = {
        k: iter(sorted((f for f in files if f.kind == k and f.size >= doc_bytes), key=order)) for k in KINDS
    }
    used = dict.fromkeys(KINDS, 0)
    seen: set[bytes] = set()
    chosen: list[tuple[CorpusFile, bytes]] = []
    budget = max_bytes if max_bytes is not None else float("inf")
    total = 0
    while queues and budget - total >= doc_bytes:
        kind = min(queues, key=lambda k: (used[k], KINDS.index(k)))
        f = next(queues[kind], None)
        if f is None:
            del queues[kind]
            continue
        data = _readable_text(f.path)
        if data is None or len(data) < doc_bytes:
            continue
        digest = hashlib.sha1(data).digest()
        if digest in seen:
            continue
        seen.add(digest)
        n = int(min(len(data) // doc_bytes, (budget - total) // doc_bytes)) * doc_bytes
        chosen.append((f, data[:n]))
        used[kind] += n
        total += n
    return sorted(chosen, key=lambda fd: fd[0].source)


# --- building and loading the Parquet corpus -----------------------------------------------------------------


def _cut(data: bytes, doc_bytes: int) -> list[bytes]:
    return [data[i : i + doc_bytes] for i in range(0, len(data) - doc_bytes + 1, doc_bytes)]


def _write_corpus(path: Path, docs: list[tuple[bytes, str]], kinds: list[str] | None, c: TextDataRaterConfig,
                  metadata: dict[str, str] | None = None) -> None:
    """Split, corrupt and write ``docs`` [(bytes, source)] (module docstring); ``kinds`` per document or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = torch.Generator().manual_seed(c.data_seed)
    perm = torch.randperm(len(docs), generator=g).tolist()
    n_out, n_held = int(c.outer_fraction * len(docs)), int(c.heldout_fraction * len(docs))
    split = {}
    for j, i in enumerate(perm):
        split[i] = "outer" if j < n_out else "heldout" if j < n_out + n_held else "train"
    train_ids = [i for i in perm if split[i] == "train"]
    n_bad = int(round(c.corrupt_fraction * len(train_ids)))
    bad = {i: CORRUPTIONS[1 + k % (len(CORRUPTIONS) - 1)] for k, i in enumerate(train_ids[:n_bad])}
    texts, sources, labels, splits = [], [], [], []
    for i, (text, src) in enumerate(docs):
        label = bad.get(i, "clean")
        if label != "clean":
            text = corrupt_document(text, label, g)
        texts.append(text.decode("latin-1"))
        sources.append(src)
        labels.append(label)
        splits.append(split[i])
    columns = {"text": texts, "source": sources}
    if kinds is not None:
        columns["kind"] = kinds
    columns.update(corruption=labels, split=splits)
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # atomic: parallel trials may prepare the same corpus


def prepare_corpus(c: TextDataRaterConfig) -> Path:
    """Build (or reuse) the Parquet corpus described in the module docstring; returns its path."""
    if c.corpus == "packages":
        return _prepare_packages_corpus(c)
    params = {k: getattr(c, k) for k in ("max_files", "doc_bytes", "corrupt_fraction", "outer_fraction",
                                         "heldout_fraction", "data_seed")}
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(c.cache_dir) / f"stdlib_corpus_{tag}.parquet"
    if path.exists():
        return path
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[: c.max_files]
    docs = [(d, str(f.relative_to(root))) for f in files for d in _cut(f.read_bytes(), c.doc_bytes)]
    _write_corpus(path, docs, None, c)
    return path


def _prepare_packages_corpus(c: TextDataRaterConfig) -> Path:
    files = list_package_files()
    fl_hash = file_list_hash(files)
    params = {k: getattr(c, k) for k in ("corpus", "max_bytes", "doc_bytes", "corrupt_fraction", "outer_fraction",
                                         "heldout_fraction", "data_seed")}
    params.update(file_list_hash=fl_hash, format=PACKAGES_FORMAT)
    tag = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(c.cache_dir) / f"packages_corpus_{tag}.parquet"
    if path.exists():
        return path
    docs, kinds = [], []
    chosen = select_package_files(files, c.doc_bytes, c.max_bytes)
    for f, data in chosen:
        for d in _cut(data, c.doc_bytes):
            docs.append((d, f.source))
            kinds.append(f.kind)
    _write_corpus(path, docs, kinds, c, {"corpus": "packages", "file_list_hash": fl_hash,
                                         "candidate_files": str(len(files)), "files": str(len(chosen))})
    return path


def load_corpus(path: Path) -> dict[str, object]:
    """Per split: documents [n, doc_bytes] (uint8) and corruption codes [n]; ``facts``: the corpus metrics."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    t = table.to_pydict()
    doc_len = len(t["text"][0]) if t["text"] else 0
    out: dict[str, object] = {}
    for split in SPLITS:
        idx = [i for i, s in enumerate(t["split"]) if s == split]
        joined = bytearray("".join(t["text"][i] for i in idx).encode("latin-1"))
        docs = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
        out[split] = docs.reshape(len(idx), doc_len)
        out[split + "_code"] = torch.tensor([CORRUPTIONS.index(t["corruption"][i]) for i in idx], dtype=torch.long)
    kinds = t.get("kind", ["source"] * len(t["text"]))
    facts = {"meta/corpus/docs": float(len(t["text"])),
             **{f"meta/corpus/docs/{s}": float(t["split"].count(s)) for s in SPLITS},
             **{f"meta/corpus/docs/{k}": float(kinds.count(k)) for k in KINDS},
             "meta/corpus/corrupted_docs": float(len(t["corruption"]) - t["corruption"].count("clean")),
             "meta/corpus/bytes": float(len(t["text"]) * doc_len),
             "meta/corpus/files": float(len(set(t["source"])))}
    if "file_list_hash" in meta:
        facts["meta/corpus/file_list_hash"] = float(int(meta["file_list_hash"], 16))  # 48 bits: exact in a float
    out["facts"] = facts
    out["metadata"] = meta
    out["sources"] = sorted(set(t["source"]))
    return out


@dataclass
class TextProblem:
    """RaterProblem for the byte LM (picklable). Documents are [n_docs, doc_bytes] uint8 byte tensors."""

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
        """n random windows [n, seq_len] (byte ids, long) and the index of each one's document [n]."""
        d = torch.randint(0, docs.shape[0], (n,), generator=gen)
        o = torch.randint(0, docs.shape[1] - self.seq_len + 1, (n,), generator=gen)
        return docs[d[:, None], o[:, None] + torch.arange(self.seq_len)].long(), d

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
        path = prepare_corpus(c)
        self.corpus = load_corpus(path)
        self.corpus_facts: dict[str, float] = self.corpus["facts"]
        self._report_corpus(path)
        problem = TextProblem(self.corpus["train"], self.corpus["outer"], c.seq_len, c.d_model, c.n_layers,
                              c.n_heads, c.rater_d_model, c.rater_layers)
        g = torch.Generator().manual_seed(c.data_seed + 1)
        toks, d = problem.windows(self.corpus["train"], g, c.score_examples)
        self._score = (Batch(toks, toks, toks), self.corpus["train_code"][d])
        held, _ = problem.windows(self.corpus["heldout"], g, c.heldout_examples)
        self._heldout = Batch(held, held, held)
        return problem

    def _report_corpus(self, path: Path) -> None:
        """Print the corpus facts and write them, with the file list, to ``corpus.json`` in the artifacts."""
        f, meta = self.corpus_facts, self.corpus["metadata"]
        kinds = ", ".join(f"{f[f'meta/corpus/docs/{k}']:.0f} {k}" for k in KINDS)
        print(f"[{type(self).__name__}] corpus {self.config.corpus} ({path.name}): {f['meta/corpus/docs']:.0f} documents "
              f"({kinds}) from {f['meta/corpus/files']:.0f} files, {f['meta/corpus/bytes'] / 1e6:.1f} MB"
              + (f"; file-list hash {meta['file_list_hash']}" if "file_list_hash" in meta else ""), flush=True)
        if self.artifact_dir is not None:
            manifest = {"corpus": self.config.corpus, "file": path.name, **meta,
                        "facts": {k.removeprefix("meta/corpus/"): v for k, v in f.items() if k != "meta/corpus/file_list_hash"},
                        "sources": self.corpus["sources"]}
            Path(self.artifact_dir, "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")

    def train(self) -> dict[str, float]:
        return {**super().train(), **self.corpus_facts}

    def scoring_set(self) -> tuple[Batch, Tensor]:
        return self._score

    def heldout_set(self) -> Batch:
        return self._heldout

    def probe_inputs(self, n: int) -> Tensor:
        return self._score[0].r[:n]
