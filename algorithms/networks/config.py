"""The spec's ``config.network`` block: architecture and the update pieces around the optimiser.

Pure pydantic (no torch import), so registering the block at spec load stays cheap::

    config:
      network: {hidden: [256, 256], norm: layer, nap: true, weight_decay: {kind: l2, coef: 1e-3}}

Methods (docs/methods.md#nap, #weight-decay-and-l2-init, #plasticity-interventions): Normalize-and-Project
(Lyle et al. 2024, arXiv 2407.01800), LayerNorm + L2 and L2-Init (Lyle et al. 2024, arXiv 2402.18762), ReDo
(Sokar et al. 2023), Shrink & Perturb (Ash & Adams 2020), resets (Nikishin et al. 2022), CReLU (Shang et
al. 2016; Abbas et al. 2023). The interventions combine by listing them::

    network: {norm: layer, redo: {every: 1000, tau: 0.025}, weight_decay: {kind: l2, coef: 1e-4}}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Activation = Literal["relu", "tanh", "elu", "gelu", "silu", "leaky_relu", "crelu"]
Norm = Literal["none", "layer", "rms"]
Encoder = Literal["auto", "nature_cnn"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightDecayConfig(_Strict):
    """Decoupled weight decay applied after each optimiser step (AdamW / Optax convention).

    theta <- theta - lr_t * coef * (theta - theta_ref), theta_ref = 0 (``l2``) or theta_0 (``l2_init``).
    """

    kind: Literal["none", "l2", "l2_init"] = "none"
    """none | l2 (towards zero) | l2_init (towards the initial weights)."""
    coef: float = Field(0.0, ge=0)
    """lambda: decay per unit learning rate per optimiser step."""


class LRScheduleConfig(_Strict):
    """An explicit learning-rate schedule, a multiplier m(t) in [0, 1] on each optimiser's base rate.

    Steps are optimiser steps in our tasks and env steps sampled (RLlib's own schedule unit) inside
    RLlib learners. With ``restart_at_task_boundary`` the schedule sees t mod ``task_length``.
    """

    kind: Literal["constant", "warmup_cosine"] = "constant"
    """constant | warmup_cosine (linear warm-up, then cosine decay to final_fraction)."""
    warmup_steps: int = Field(0, ge=0)
    """W: steps of linear warm-up."""
    total_steps: int | None = Field(None, ge=1)
    """T: warm-up plus cosine length; defaults to task_length when restarting at task boundaries."""
    final_fraction: float = Field(0.0, ge=0, le=1)
    """f: multiplier reached at the end of the cosine (held afterwards)."""
    restart_at_task_boundary: bool = False
    """Restart the schedule at every task boundary (NaP's continual setting)."""
    task_length: int | None = Field(None, ge=1)
    """Steps per task. Tasks fill it from their own switch period when left out."""

    @model_validator(mode="after")
    def _check(self) -> LRScheduleConfig:
        if self.kind == "warmup_cosine" and self.total_steps is not None and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"lr_schedule.total_steps ({self.total_steps}) must exceed lr_schedule.warmup_steps "
                f"({self.warmup_steps})"
            )
        return self


class ReDoConfig(_Strict):
    """ReDo (Sokar et al. 2023): recycle dormant hidden units every ``every`` optimiser steps.

    Unit i of a hidden layer is dormant when s_i = E|h_i| / ((1/H) Σ_j E|h_j|) ≤ tau on the last update's
    batch; its incoming weights and bias are drawn afresh, its outgoing weights set to zero and its Adam
    moments reset (algorithms/networks/interventions.py::ReDo).
    """

    every: int = Field(1000, ge=1)
    """Recycle every k optimiser steps (on the k-th, 2k-th, ... step)."""
    tau: float = Field(0.025, ge=0)
    """τ: units with score s_i ≤ τ are recycled (0.025 and 0.1 are the thresholds commonly used)."""
    seed: int = 0
    """Seed of the piece's generator for the fresh draws (its state is checkpointed)."""


class ShrinkPerturbConfig(_Strict):
    """Shrink & Perturb (Ash & Adams 2020): θ ← λ·θ + σ·θ₀' every ``every`` optimiser steps, θ₀' a fresh
    draw from the network's initialiser (algorithms/networks/interventions.py::ShrinkPerturb)."""

    every: int = Field(1000, ge=1)
    """Apply every k optimiser steps."""
    shrink: float = Field(0.8, ge=0, le=1)
    """λ in [0, 1]: the factor on the current parameters."""
    perturb: float = Field(0.01, ge=0)
    """σ ≥ 0: the factor on the fresh initialisation."""
    seed: int = 0
    """Seed of the piece's generator for the fresh draws (its state is checkpointed)."""


class ResetConfig(_Strict):
    """Periodic resets (Nikishin et al. 2022): re-initialise all layers or the last k layers of every
    network every ``every`` optimiser steps; their optimiser state is cleared and target copies take the
    fresh weights (algorithms/networks/interventions.py::Reset)."""

    every: int = Field(ge=1)
    """Reset every k optimiser steps."""
    layers: Literal["all", "last_k"] = "all"
    """all | last_k: which layers of each network (output or heads count as the last layer)."""
    k: int | None = Field(None, ge=1)
    """With layers=last_k: how many layers from the output side."""
    seed: int = 0
    """Seed of the piece's generator for the fresh draws (its state is checkpointed)."""

    @model_validator(mode="after")
    def _check(self) -> ResetConfig:
        if self.layers == "last_k" and self.k is None:
            raise ValueError("reset.k is required with reset.layers=last_k")
        if self.layers == "all" and self.k is not None:
            raise ValueError("reset.k is only used with reset.layers=last_k")
        return self


class CNNConfig(_Strict):
    """Convolutional torso (MinAtar-sized by default: one 3x3 conv with 16 channels, stride 1).

    Inputs are channels-last [H, W, C] as RLlib's encoders and our MinAtar envs provide them.
    """

    channels: list[int] = Field(default_factory=lambda: [16], min_length=1)
    """Output channels of each conv layer."""
    kernel: int | list[int] = 3
    """Kernel size (one for all layers, or one per layer)."""
    stride: int | list[int] = 1
    """Stride (one for all layers, or one per layer)."""

    @model_validator(mode="after")
    def _check(self) -> CNNConfig:
        for key in ("kernel", "stride"):
            v = getattr(self, key)
            if isinstance(v, list) and len(v) != len(self.channels):
                raise ValueError(f"cnn.{key} has {len(v)} entries but cnn.channels has {len(self.channels)}")
            if any(x < 1 for x in (v if isinstance(v, list) else [v])):
                raise ValueError(f"cnn.{key} must be >= 1, got {v}")
        return self

    def per_layer(self, key: str) -> list[int]:
        v = getattr(self, key)
        return list(v) if isinstance(v, list) else [v] * len(self.channels)


class NetworkConfig(_Strict):
    """Architecture and update pieces of every network built in the project."""

    encoder: Encoder = "auto"
    """auto | nature_cnn. auto: an MLP for flat observations [D], the ``cnn`` torso for channels-last images
    [H, W, C]. nature_cnn: the Nature-DQN torso (Mnih et al. 2015) for channels-first pixel stacks [C, H, W]
    in [0, 255] such as ``ale/<Game>``'s [4, 84, 84]: x/255, conv 32 8x8 stride 4, conv 64 4x4 stride 2,
    conv 64 3x3 stride 1, then the ``hidden`` dense layers ([512] unless given)."""
    hidden: list[int] = Field(default_factory=lambda: [256, 256])
    """Widths of the hidden (fully connected) layers (after the conv layers of a CNN encoder)."""
    activation: Activation = "relu"
    """relu | tanh | elu | gelu | silu | leaky_relu | crelu (nn.Module instances, hookable). crelu is
    [relu(x), relu(−x)] concatenated (Shang et al. 2016): a hidden layer of width H feeds 2H features on."""
    norm: Norm = "none"
    """none | layer | rms: normalisation before each nonlinearity; the layer's bias is then removed."""
    nap: bool = False
    """Normalize-and-Project: project hidden weights (and norm parameters) to their initial norms.
    Meant with norm layer|rms: only then is the projection function-preserving."""
    nap_every: int = Field(1, ge=1)
    """Project every k optimiser steps."""
    weight_decay: WeightDecayConfig = Field(default_factory=WeightDecayConfig)
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    redo: ReDoConfig | None = None
    """ReDo: recycle dormant units (off when unset)."""
    shrink_perturb: ShrinkPerturbConfig | None = None
    """Shrink & Perturb (off when unset)."""
    reset: ResetConfig | None = None
    """Periodic full or last-k-layer resets (off when unset)."""
    cnn: CNNConfig | None = None
    """Conv torso for image observations [H, W, C]; image inputs use the default CNNConfig when unset."""

    @model_validator(mode="after")
    def _check(self) -> NetworkConfig:
        if any(w < 1 for w in self.hidden):
            raise ValueError(f"network.hidden widths must be >= 1, got {self.hidden}")
        if self.encoder == "nature_cnn":
            if self.cnn is not None:
                raise ValueError("network.cnn is the auto encoder's conv torso; encoder nature_cnn has fixed conv layers")
            if "hidden" not in self.model_fields_set:
                self.hidden = [512]  # Mnih et al. (2015): one dense layer of 512 after the convs
        return self
