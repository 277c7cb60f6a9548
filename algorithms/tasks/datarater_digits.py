"""DataRater on scikit-learn's bundled digits (8x8 images, 10 classes) with known corruptions.

Data (fixed by ``data_seed``): the 1797 images (pixels / 16) are split into a clean test set
(``n_test``, for the evaluation), a clean outer set (``n_outer``, held-out data for the outer loss)
and the training pool (the rest). A fraction ``corrupt_fraction`` of the pool is corrupted, half of
it each way:
- ``random_label``: the label is replaced by a different, uniformly drawn class;
- ``noise_image``: the pixels are replaced by uniform noise in [0, 1] (label kept).

Inner model: MLP 64 -> hidden -> 10. Rater: :class:`DigitsRater` on (pixels, one-hot label) -> score,
so it can see label noise. Metrics: see algorithms/tasks/datarater_common.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor, nn

from algorithms.datarater.models import MLP, classification_per_example_loss
from algorithms.datarater.objective import Batch
from algorithms.tasks.datarater_common import DataRaterTask, DataRaterTaskConfig

CORRUPTIONS = ("clean", "random_label", "noise_image")


class DigitsDataRaterConfig(DataRaterTaskConfig):
    corrupt_fraction: float = Field(0.3, ge=0, lt=1)
    """Fraction of the training pool corrupted (half random labels, half noise images)."""
    data_seed: int = 0
    """Seed of the split and the corruption (fixed across trial seeds by default)."""
    n_test: int = Field(400, ge=10)
    n_outer: int = Field(300, ge=10)
    hidden: int = Field(64, ge=1)
    """Inner MLP width (one hidden layer)."""
    rater_hidden: int = Field(64, ge=1)
    """Rater trunk width."""


def load_corrupted_digits(
    corrupt_fraction: float, data_seed: int, n_test: int, n_outer: int
) -> dict[str, Tensor]:
    """The split described in the module docstring; ``pool_code`` is 0 clean, 1 random_label, 2 noise_image."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(data_seed)
    perm = torch.randperm(len(x), generator=g)
    test, outer, pool = perm[:n_test], perm[n_test : n_test + n_outer], perm[n_test + n_outer :]
    if len(pool) < 10:
        raise ValueError(f"n_test={n_test} + n_outer={n_outer} leave only {len(pool)} training examples")
    px, py = x[pool].clone(), y[pool].clone()
    code = torch.zeros(len(pool), dtype=torch.long)
    n_bad = int(round(corrupt_fraction * len(pool)))
    bad = torch.randperm(len(pool), generator=g)[:n_bad]
    lab, noise = bad[: n_bad // 2], bad[n_bad // 2 :]
    py[lab] = (py[lab] + torch.randint(1, 10, (len(lab),), generator=g)) % 10
    code[lab] = 1
    px[noise] = torch.rand(len(noise), 64, generator=g)
    code[noise] = 2
    return {"pool_x": px, "pool_y": py, "pool_code": code, "outer_x": x[outer], "outer_y": y[outer],
            "test_x": x[test], "test_y": y[test]}


class DigitsRater(nn.Module):
    """φ_η(x, y) = c_η(x)[y] + q_η(x): a class-compatibility term and a quality term on a shared trunk.

    Input r = (pixels[64], one-hot label[10]). The trunk h = MLP(pixels); c = Linear(h) -> [10] and
    q = Linear(h) -> [1]; the label enters through c(x)·onehot(y), so "does this image look like its
    label" is one linear read-out away (a plain MLP on the concatenation learns it far more slowly).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.trunk = MLP(64, (hidden,), hidden, "relu")
        self.compat = nn.Linear(hidden, 10)
        self.quality = nn.Linear(hidden, 1)

    def forward(self, r: Tensor) -> Tensor:
        x, onehot = r[:, :64], r[:, 64:]
        h = torch.relu(self.trunk(x))
        return (self.compat(h) * onehot).sum(-1) + self.quality(h).squeeze(-1)


def rater_input(x: Tensor, y: Tensor) -> Tensor:
    return torch.cat([x, nn.functional.one_hot(y, 10).to(x.dtype)], dim=1)


@dataclass
class DigitsProblem:
    """RaterProblem for digits (picklable)."""

    data: dict[str, Tensor]
    hidden: int
    rater_hidden: int

    def make_inner_model(self) -> nn.Module:
        return MLP(64, (self.hidden,), 10, "relu")

    def make_rater(self) -> nn.Module:
        return DigitsRater(self.rater_hidden)

    def per_example_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return classification_per_example_loss(output, target)

    def sample_train(self, gen: torch.Generator, n: int) -> Batch:
        i = torch.randint(0, len(self.data["pool_x"]), (n,), generator=gen)
        x, y = self.data["pool_x"][i], self.data["pool_y"][i]
        return Batch(x, y, rater_input(x, y))

    def sample_outer(self, gen: torch.Generator, n: int) -> Batch:
        i = torch.randint(0, len(self.data["outer_x"]), (n,), generator=gen)
        x, y = self.data["outer_x"][i], self.data["outer_y"][i]
        return Batch(x, y, rater_input(x, y))


class DigitsDataRater(DataRaterTask):
    Config = DigitsDataRaterConfig
    corruption_names = CORRUPTIONS

    def build_problem(self) -> DigitsProblem:
        c = self.config
        self.data = load_corrupted_digits(c.corrupt_fraction, c.data_seed, c.n_test, c.n_outer)
        return DigitsProblem(self.data, c.hidden, c.rater_hidden)

    def scoring_set(self) -> tuple[Batch, Tensor]:
        x, y = self.data["pool_x"], self.data["pool_y"]
        return Batch(x, y, rater_input(x, y)), self.data["pool_code"]

    def heldout_set(self) -> Batch:
        x, y = self.data["test_x"], self.data["test_y"]
        return Batch(x, y, rater_input(x, y))

    def probe_inputs(self, n: int) -> Tensor:
        return rater_input(self.data["pool_x"][:n], self.data["pool_y"][:n])
