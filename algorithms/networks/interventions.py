"""Plasticity interventions as update pieces around any torch optimiser: ReDo, Shrink & Perturb, resets.

The pieces have the interface of :mod:`algorithms.networks.updates` (``init``, ``before_step``, ``after_step``,
``state_dict``, ``load_state_dict``, plus ``metrics``) and are built from the network block by
:func:`algorithms.networks.updates.network_updates`, so every learner that runs that chain (the RLlib learner
mixin, the off-policy core, the tasks' plain loops) gets them. ``step`` is the index (0, 1, ...) of the
optimiser step just taken; a piece with ``every = k`` acts after steps k−1, 2k−1, ... (the k-th, 2k-th step).
CReLU, the fourth intervention, is an activation of the builders (:class:`algorithms.networks.builders.CReLU`).

What a "layer" is here (:func:`network_layers`): for every trainable :class:`~algorithms.networks.builders.Network`
inside the module (frozen target copies are skipped), its hidden blocks in order (a block's weight layer and
its norm count as one layer), then its output layer; a torso built without an output layer ends in the
*heads* the containing module declares with ``network_heads() -> {torso name: [head module names]}`` (our
RLlib PPO/DQN modules do: ``pi``/``vf``, ``af``/``vf``), all heads together counting as the last layer.

Fresh draws come from each layer's own initialiser (``reset_parameters()`` of a CPU copy, run under a seed
drawn from the piece's ``torch.Generator``; the global RNG streams are untouched), so they follow the same
distribution as the network's initialisation. Each piece's generator state is part of its ``state_dict``:
a restored learner continues with the same draws.

Math in pure functions: :func:`redo_scores`, :func:`redo_reset_`, :func:`shrink_perturb_`,
:func:`fresh_parameters`, :func:`reset_layers_`. Sources: Sokar et al., "The Dormant Neuron Phenomenon in
Deep Reinforcement Learning", ICML 2023 (ReDo); Ash & Adams, "On Warm-Starting Neural Network Training",
NeurIPS 2020 (Shrink & Perturb); Nikishin et al., "The Primacy Bias in Deep Reinforcement Learning", ICML 2022
(resets). Equations: docs/methods.md#plasticity-interventions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from algorithms.diagnostics.plasticity import dormant_scores
from algorithms.networks.builders import trainable_networks

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]

#: Per-parameter optimiser state that is a running moment of the gradient (Adam, AMSGrad, SGD momentum).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _as_list(optimizers: Optimizers) -> list[torch.optim.Optimizer]:
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)


# --------------------------------------------------------------------------------------------------
# The layers of a module
# --------------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One layer of a network for the interventions (module docstring)."""

    name: str
    """Qualified name: ``<torso>.blocks.<i>``, ``<torso>.output`` or ``<torso>.heads``."""
    modules: list[nn.Module]
    """Modules re-initialised together: a hidden block's weight layer and norm, the output, or the heads."""
    act: nn.Module | None = None
    """The hidden block's activation (None for the output/heads)."""
    consumers: list[nn.Module] = field(default_factory=list)
    """The layers reading this hidden block's features (next block's layer, the output, or the heads)."""

    @property
    def width_factor(self) -> int:
        """Features handed on per unit: 2 after CReLU, else 1."""
        return int(getattr(self.act, "width_factor", 1))


def network_layers(module: nn.Module) -> list[list[Layer]]:
    """Per trainable Network in ``module``: its layers, input side first (module docstring)."""
    declared = module.network_heads() if callable(getattr(module, "network_heads", None)) else {}
    chains: list[list[Layer]] = []
    for prefix, net in trainable_networks(module):
        pre = f"{prefix}." if prefix else ""
        blocks = net._all_blocks()
        if net.output is not None:
            tail = Layer(f"{pre}output", [net.output])
        else:
            heads = [module.get_submodule(n) for n in declared.get(prefix, [])]
            tail = Layer(f"{pre}heads", heads) if heads else None
        layers: list[Layer] = []
        for i, (name, block) in enumerate(blocks):
            if i + 1 < len(blocks):
                consumers = [blocks[i + 1][1].layer]
            else:
                consumers = list(tail.modules) if tail is not None else []
            modules = [block.layer] + ([] if isinstance(block.norm, nn.Identity) else [block.norm])
            layers.append(Layer(f"{pre}{name}", modules, block.act, consumers))
        if tail is not None:
            layers.append(tail)
        chains.append(layers)
    return chains


# --------------------------------------------------------------------------------------------------
# Fresh draws and optimiser state
# --------------------------------------------------------------------------------------------------


def fresh_parameters(layer: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """A fresh draw θ₀' of ``layer``'s own parameters from its initialiser: {name: tensor}.

    ``reset_parameters()`` of a CPU copy of the layer under a seed drawn from ``generator`` (the global RNG
    is untouched; the result is on the parameters' device and dtype). A layer without parameters gives {}.
    """
    own = dict(layer.named_parameters(recurse=False))
    if not own:
        return {}
    if not callable(getattr(layer, "reset_parameters", None)):
        raise ValueError(f"network: {type(layer).__name__} has no reset_parameters(), so it cannot be re-initialised")
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    clone = copy.deepcopy(layer).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        clone.reset_parameters()
    return {n: p.detach().to(device=own[n].device, dtype=own[n].dtype) for n, p in clone.named_parameters(recurse=False)}


def _states_of(param: Tensor, optimizers: Optimizers) -> list[dict]:
    return [opt.state[param] for opt in _as_list(optimizers) if param in opt.state]


def clear_optimizer_state_(params: Sequence[Tensor], optimizers: Optimizers) -> None:
    """Drop the optimisers' state of ``params`` (Adam then starts them afresh: zero moments, step 0)."""
    for opt in _as_list(optimizers):
        for p in params:
            opt.state.pop(p, None)


@torch.no_grad()
def sync_target_copies_(module: nn.Module, params: Sequence[Tensor]) -> int:
    """θ_targ ← θ for every target copy of ``params`` (pairs from ``module.get_target_network_pairs()``,
    RLlib's TargetNetworkAPI; the off-policy core and RLlib DQN); returns the tensors copied."""
    pairs_fn = getattr(module, "get_target_network_pairs", None)
    if not callable(pairs_fn):
        return 0
    wanted = {id(p) for p in params}
    copied = 0
    for online, target in pairs_fn():
        for p, t in zip(online.parameters(), target.parameters(), strict=True):
            if id(p) in wanted:
                t.copy_(p)
                copied += 1
    return copied


# --------------------------------------------------------------------------------------------------
# ReDo
# --------------------------------------------------------------------------------------------------


def redo_scores(activations: Tensor, width_factor: int = 1) -> Tensor:
    """ReDo scores of one hidden layer's H units: s_i = E|h_i| / ((1/H) Σ_j E|h_j|)  (Sokar et al. 2023, eq. 1).

    ``activations``: the layer's post-activation features [N, F] (dense; leading dims are flattened into N)
    or [N, F, H, W] (conv; a unit is a channel). Expectations are over the N inputs (and positions). With
    CReLU (``width_factor`` 2) unit i hands on features i and i + H, and its score uses E|h_i| + E|h_{i+H}|
    (= E|x_i| of the pre-activation) in the same formula. Reuses
    :func:`algorithms.diagnostics.plasticity.dormant_scores`; all-zero features give s = 0.
    """
    s = dormant_scores(activations)  # E|h_f| / mean_f E|h_f| over the F features
    if width_factor == 1:
        return s
    if width_factor != 2 or s.numel() % 2:
        raise ValueError(f"redo_scores: width_factor must be 1 or 2 with an even feature count, got {width_factor}")
    half = s.numel() // 2
    return (s[:half] + s[half:]) / 2  # mean_f s_f = 1, so this is u_i / mean_j u_j for u_i = E|h_i| + E|h_{i+H}|


def _feature_view(weight: Tensor, consumer: nn.Module, features: int) -> Tensor:
    """A view of a consumer's weight with the input features at dim 1: Linear [O, F, S] (S = H·W positions
    after a conv → flatten, else 1), Conv2d [O, F, k, k]."""
    if isinstance(consumer, nn.Linear):
        if consumer.in_features % features:
            raise ValueError(f"network.redo: {consumer} does not read {features} features")
        return weight.view(weight.shape[0], features, consumer.in_features // features)
    if isinstance(consumer, nn.Conv2d):
        return weight
    raise ValueError(f"network.redo: cannot zero the outgoing weights of a {type(consumer).__name__}")


@torch.no_grad()
def redo_reset_(layer: Layer, dormant: Tensor, fresh: Sequence[dict[str, Tensor]], optimizers: Optimizers) -> int:
    """Recycle the units ``dormant`` [H] (bool) of hidden layer ``layer``; returns their number.

    For every dormant unit i: incoming weights and bias (and the norm's scale/offset of unit i, when the block
    has a norm) ← their fresh draw ``fresh`` (one dict per module of ``layer.modules``, from
    :func:`fresh_parameters`); outgoing weights (the consumers' input columns of the unit's features: i, and
    i + H after CReLU) ← 0; the optimisers' moments (exp_avg, exp_avg_sq, ...) of exactly those rows and
    columns ← 0. Adam's per-tensor step count is left as it is. All other entries are untouched.
    """
    if not bool(dormant.any()):
        return 0
    for module, draw in zip(layer.modules, fresh, strict=True):
        for name, p in module.named_parameters(recurse=False):
            p[dormant] = draw[name][dormant]
            for state in _states_of(p, optimizers):
                for key in MOMENT_KEYS:
                    if isinstance(state.get(key), Tensor) and state[key].shape == p.shape:
                        state[key][dormant] = 0
    features = torch.cat([dormant] * layer.width_factor)
    for consumer in layer.consumers:
        w = consumer.weight
        _feature_view(w, consumer, features.numel())[:, features] = 0
        for state in _states_of(w, optimizers):
            for key in MOMENT_KEYS:
                if isinstance(state.get(key), Tensor) and state[key].shape == w.shape:
                    _feature_view(state[key], consumer, features.numel())[:, features] = 0
    return int(dormant.sum())


class ReDo:
    """Recycle dormant units every ``every`` optimiser steps (Sokar et al. 2023, Alg. 1).

    On steps k·every − 1 (the every-th, 2·every-th, ... step), for each hidden layer with units H:
    s_i = E|h_i| / ((1/H) Σ_j E|h_j|) on the batch of that step's forward pass, and each unit with s_i ≤ τ
    gets fresh incoming weights and bias, zero outgoing weights and zero Adam moments (:func:`redo_reset_`).

    The batch: forward hooks on the hidden activation modules keep the features of the *last* forward call
    before the step (the update's own batch: in RLlib learners the minibatch of that optimiser step; in DQN
    the last call is on next observations, also replay states). The hooks are registered only after step
    k·every − 2 and removed after the firing step, so they cost nothing on the other steps (with every = 1
    they stay). A layer whose activations were not seen on that step is left alone. Frozen target copies are
    not touched: they follow the online network through the algorithm's target updates.

    Supports dense and conv layers of :func:`~algorithms.networks.builders.build_network` networks (with any
    norm and CReLU); grouped networks (EVE's q_heads=per_action) are rejected at ``init``.
    """

    def __init__(self, every: int, tau: float, seed: int = 0):
        if every < 1:
            raise ValueError(f"network.redo.every must be >= 1, got {every}")
        if tau < 0:
            raise ValueError(f"network.redo.tau must be >= 0, got {tau}")
        self.every, self.tau = every, tau
        self.generator = torch.Generator().manual_seed(seed)
        self.units_reset = 0
        self.firings = 0
        self.last_dormant_fraction = 0.0
        self.layers: list[Layer] = []
        self._acts: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def init(self, module: nn.Module, optimizers: Optimizers) -> None:
        self.layers = [layer for chain in network_layers(module) for layer in chain if layer.act is not None]
        for layer in self.layers:
            if not isinstance(layer.modules[0], nn.Linear | nn.Conv2d):
                raise ValueError(f"network.redo: layer {layer.name} is a {type(layer.modules[0]).__name__}; ReDo "
                                 "supports Linear/Conv2d layers (not grouped networks such as EVE's q_heads=per_action)")
            if not layer.consumers:
                raise ValueError(f"network.redo: the features of {layer.name} feed layers the module does not declare "
                                 "(a torso without output layer needs network_heads() on its module)")
            for c in layer.consumers:
                if not isinstance(c, nn.Linear | nn.Conv2d):
                    raise ValueError(f"network.redo: {layer.name} feeds a {type(c).__name__}; ReDo supports "
                                     "Linear/Conv2d consumers")
        self._disarm()
        if self.every == 1:
            self._arm()

    def _arm(self) -> None:
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.act.register_forward_hook(self._hook(layer.name, layer.act)))

    def _hook(self, name: str, act: nn.Module):
        def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
            if mod is act and isinstance(out, Tensor):  # deep copies (target networks) carry the hook too
                self._acts[name] = out.detach()

        return hook

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        pass

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        if (step + 1) % self.every == 0:
            self.fire(optimizers)
            if self.every > 1:
                self._disarm()
        if self.every > 1 and (step + 2) % self.every == 0:
            self._arm()

    @torch.no_grad()
    def fire(self, optimizers: Optimizers) -> int:
        """Recycle the dormant units of every layer seen since arming; returns the units recycled."""
        reset = total = 0
        for layer in self.layers:
            h = self._acts.get(layer.name)
            if h is None:
                continue
            if isinstance(layer.modules[0], nn.Linear):
                h = h.reshape(-1, h.shape[-1])
            dormant = redo_scores(h, layer.width_factor) <= self.tau
            total += dormant.numel()
            if bool(dormant.any()):
                fresh = [fresh_parameters(m, self.generator) for m in layer.modules]
                reset += redo_reset_(layer, dormant.to(layer.modules[0].weight.device), fresh, optimizers)
        self._acts.clear()
        self.firings += 1
        self.units_reset += reset
        self.last_dormant_fraction = reset / total if total else 0.0
        return reset

    def metrics(self) -> dict[str, float]:
        return {"redo_units_reset": float(self.units_reset), "redo_firings": float(self.firings),
                "redo_dormant_fraction": self.last_dormant_fraction}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "units_reset": self.units_reset, "firings": self.firings,
                "last_dormant_fraction": self.last_dormant_fraction, "armed": bool(self._handles)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.units_reset, self.firings = int(state["units_reset"]), int(state["firings"])
        self.last_dormant_fraction = float(state["last_dormant_fraction"])
        self._disarm()
        if state["armed"] or self.every == 1:
            self._arm()


# --------------------------------------------------------------------------------------------------
# Shrink & Perturb
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def shrink_perturb_(param: Tensor, fresh: Tensor, shrink: float, perturb: float) -> None:
    """In place: θ ← λ·θ + σ·θ₀' with θ₀' a fresh draw from the initialiser (Ash & Adams 2020)."""
    param.copy_(shrink * param + perturb * fresh)


class ShrinkPerturb:
    """θ ← λ·θ + σ·θ₀' for every parameter of every layer (:func:`network_layers`, heads included) every
    ``every`` optimiser steps, θ₀' drawn afresh per layer from its initialiser (:func:`fresh_parameters`).

    Norm layers included (θ₀' = 1 for their scale, 0 for their offset); optimiser state and target copies
    are left as they are (the paper shrinks the weights only).
    """

    def __init__(self, every: int, shrink: float, perturb: float, seed: int = 0):
        if every < 1:
            raise ValueError(f"network.shrink_perturb.every must be >= 1, got {every}")
        self.every, self.shrink, self.perturb = every, shrink, perturb
        self.generator = torch.Generator().manual_seed(seed)
        self.applications = 0

    def init(self, module: nn.Module, optimizers: Optimizers) -> None:
        pass

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        pass

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        if (step + 1) % self.every == 0:
            self.apply(module)

    @torch.no_grad()
    def apply(self, module: nn.Module) -> None:
        for chain in network_layers(module):
            for layer in chain:
                for m in layer.modules:
                    fresh = fresh_parameters(m, self.generator)
                    for name, p in m.named_parameters(recurse=False):
                        shrink_perturb_(p, fresh[name], self.shrink, self.perturb)
        self.applications += 1

    def metrics(self) -> dict[str, float]:
        return {"shrink_perturb_applications": float(self.applications)}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "applications": self.applications}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.applications = int(state["applications"])


# --------------------------------------------------------------------------------------------------
# Resets
# --------------------------------------------------------------------------------------------------


def layers_to_reset(module: nn.Module, layers: str, k: int | None) -> list[Layer]:
    """All layers of every network (``all``) or the last k of each (``last_k``; output/heads count as one)."""
    chains = network_layers(module)
    if layers == "all":
        return [layer for chain in chains for layer in chain]
    if layers == "last_k" and k is not None and k >= 1:
        return [layer for chain in chains for layer in chain[-k:]]
    raise ValueError(f"network.reset: layers={layers!r}, k={k!r}; allowed: all, or last_k with k >= 1")


@torch.no_grad()
def reset_layers_(module: nn.Module, chosen: Sequence[Layer], optimizers: Optimizers,
                  generator: torch.Generator) -> list[Tensor]:
    """Re-initialise ``chosen`` layers: θ ← θ₀' (fresh draw), their optimiser state cleared, and every target
    copy of them (``get_target_network_pairs``) set to the fresh θ₀'. Returns the parameters reset."""
    params: list[Tensor] = []
    for layer in chosen:
        for m in layer.modules:
            fresh = fresh_parameters(m, generator)
            for name, p in m.named_parameters(recurse=False):
                p.copy_(fresh[name])
                params.append(p)
    clear_optimizer_state_(params, optimizers)
    sync_target_copies_(module, params)
    return params


class Reset:
    """Reset all layers or the last k layers of every network every ``every`` optimiser steps
    (Nikishin et al. 2022).

    θ ← θ₀' (a fresh draw from each layer's initialiser), the optimisers' state of those parameters cleared
    (Adam restarts them at zero moments and step 0). Target networks: the algorithm's frozen target copies of
    the reset layers (the off-policy core's ``target_<name>``, RLlib DQN's ``_target_*``) are set to the same
    fresh weights (this project's choice: the bootstrap targets then come from the reset network, not from the
    network the reset was meant to forget). The replay buffer lives in the learner/algorithm
    and is untouched. L2-Init references and NaP's initial norms stay those of the original initialisation.
    """

    def __init__(self, every: int, layers: str = "all", k: int | None = None, seed: int = 0):
        if every < 1:
            raise ValueError(f"network.reset.every must be >= 1, got {every}")
        if layers not in ("all", "last_k") or (layers == "last_k" and (k is None or k < 1)):
            raise ValueError(f"network.reset: layers={layers!r}, k={k!r}; allowed: all, or last_k with k >= 1")
        self.every, self.layers, self.k = every, layers, k
        self.generator = torch.Generator().manual_seed(seed)
        self.resets = 0

    def init(self, module: nn.Module, optimizers: Optimizers) -> None:
        layers_to_reset(module, self.layers, self.k)  # fail early on a module without resettable layers

    def before_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        pass

    def after_step(self, module: nn.Module, optimizers: Optimizers, step: int) -> None:
        if (step + 1) % self.every == 0:
            reset_layers_(module, layers_to_reset(module, self.layers, self.k), optimizers, self.generator)
            self.resets += 1

    def metrics(self) -> dict[str, float]:
        return {"resets": float(self.resets)}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.resets = int(state["resets"])
