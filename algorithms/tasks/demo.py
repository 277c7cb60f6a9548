"""A small real task for smoke runs and tests: linear regression trained by SGD.

Data: x ~ N(0, I_d), y = x·w* + noise·ε with w* drawn from the seed. The model is ``nn.Linear(d, 1)``
trained on fresh minibatches with plain SGD; the loss is 0.5·mean((ŷ − y)²). The optimum loss is
0.5·noise², so ``train/excess_loss`` = loss − 0.5·noise² goes to 0 as training converges.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from algorithms.tasks.base import Task, TaskConfig


class RegressionDemoConfig(TaskConfig):
    dim: int = Field(8, ge=1)
    """Input dimension d."""
    lr: float = Field(0.05, gt=0)
    """SGD learning rate."""
    batch_size: int = Field(64, ge=1)
    """Examples per SGD step."""
    steps_per_iteration: int = Field(20, ge=1)
    """SGD steps per Tune iteration."""
    noise: float = Field(0.1, ge=0)
    """Label noise standard deviation."""
    fail_at_step: int | None = None
    """Raise an error once this step is reached (for testing failure handling)."""
    write_weights: bool = False
    """Write the current weight vector to ``<artifact_dir>/weights.csv`` every iteration."""


class RegressionDemo(Task):
    Config = RegressionDemoConfig

    def __init__(self, config: RegressionDemoConfig, seed: int, artifact_dir=None):
        super().__init__(config, seed, artifact_dir)
        self.gen = torch.Generator().manual_seed(seed)
        self.w_star = torch.randn(config.dim, 1, generator=self.gen)
        self.model = torch.nn.Linear(config.dim, 1)
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, config.dim, generator=self.gen) * 0.1)
            self.model.bias.zero_()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=config.lr)

    def train(self) -> dict[str, float]:
        c = self.config
        total = 0.0
        for _ in range(c.steps_per_iteration):
            if c.fail_at_step is not None and self.steps >= c.fail_at_step:
                raise RuntimeError(f"regression_demo: fail_at_step={c.fail_at_step} reached")
            x = torch.randn(c.batch_size, c.dim, generator=self.gen)
            y = x @ self.w_star + c.noise * torch.randn(c.batch_size, 1, generator=self.gen)
            loss = 0.5 * (self.model(x) - y).pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.steps += 1
            total += loss.item()
        mean_loss = total / c.steps_per_iteration
        if c.write_weights and self.artifact_dir is not None:
            w = self.model.weight.detach().flatten().tolist()
            (self.artifact_dir / "weights.csv").write_text(",".join(f"{v:.6g}" for v in w) + "\n")
        return {
            "train/loss": mean_loss,
            "train/excess_loss": mean_loss - 0.5 * c.noise**2,
            "train/weight_error": (self.model.weight.detach().T - self.w_star).norm().item(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "w_star": self.w_star,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        self.w_star = state["w_star"]

    def modules(self) -> dict[str, Any]:
        return {"model": self.model}

    def probe_inputs(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.config.dim, generator=torch.Generator().manual_seed(self.seed + 10_007))
