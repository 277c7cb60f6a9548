"""MLP, small CNN and Nature-DQN CNN builders: the one place networks are built.

Every hidden layer is a :class:`HiddenBlock` ``layer -> norm -> act`` (Linear or Conv2d, then
LayerNorm / RMSNorm / Identity, then an activation *module*). With a norm the layer has no bias: the
norm's offset takes its role and the block becomes scale-invariant in the layer's weight
(norm(c·Wx) = norm(Wx) for c > 0), which is what Normalize-and-Project relies on (Lyle et al. 2024).

How to find things (used by NaP and by diagnostics):

- :meth:`Network.hidden_layers` / :meth:`Network.named_hidden_layers`: the Linear/Conv2d modules of the
  hidden blocks, in order. NaP projects their weights.
- :meth:`Network.norm_layers`: the norm modules (NaP projects scale and offset jointly per layer).
- :attr:`Network.output`: the output Linear (None for a torso built with ``out_dim=None``); never
  projected.
- :meth:`Network.named_activations`: the activation modules; a forward hook on them sees the hidden
  features. :func:`named_hidden_activations` finds them in any module (e.g. an RLlib RLModule).

CReLU (``activation: crelu``, Shang et al. 2016): the block's activation is :class:`CReLU`,
[relu(x), relu(−x)] concatenated on the feature (dense) or channel (conv) axis, so a hidden layer of width
H (C channels) hands 2H features (2C channels) to the next layer; ``out_features`` of a torso is then
2·hidden[-1]. Hooks on the activation see those 2H features (:attr:`CReLU.is_activation` lets the
plasticity diagnostics find it).

Encoders (``network.encoder``): ``auto`` builds an :class:`MLP` for flat observations [D] and a
:class:`CNN` (``network.cnn``) for channels-last images [H, W, C]; ``nature_cnn`` builds a :class:`NatureCNN`
for channels-first pixel stacks [C, H, W] (``ale/<Game>``). Conv blocks follow the dense blocks' rule: with a
norm the conv has no bias and the norm (over [C, H, W] of its output) sits before the activation.

Naming convention: ``blocks.<i>.layer``, ``blocks.<i>.norm``, ``blocks.<i>.act`` and ``output``; a CNN
has ``convs.<i>.*`` before its ``blocks``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from algorithms.networks.config import CNNConfig, NetworkConfig

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


class RMSNorm(nn.Module):
    """y = g ⊙ x / sqrt(mean(x²) + eps) + b over the trailing ``shape`` dims (Zhang & Sennrich 2019).

    Unlike ``torch.nn.RMSNorm`` this carries an offset b, so (like LayerNorm) it replaces the bias of
    the layer before it and the block is scale-invariant in that layer's weight.
    """

    def __init__(self, shape: int | Sequence[int], eps: float = 1e-5):
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.shape))
        self.bias = nn.Parameter(torch.zeros(self.shape))

    def reset_parameters(self) -> None:
        """g = 1, b = 0 (the initialiser that resets and ReDo draw from)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.shape), 0))
        return self.weight * x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + self.eps) + self.bias


class CReLU(nn.Module):
    """CReLU(x) = [relu(x), relu(−x)] concatenated along ``dim`` (Shang et al., ICML 2016).

    Doubles the size of ``dim``: feature i of the input becomes outputs i and i + n (n the input size of
    ``dim``). Used against plasticity loss by Abbas et al. 2023 ("Loss of plasticity in continual deep
    RL", CoLLAs): a unit never has zero gradient on both halves at once.
    """

    is_activation = True  # a hidden nonlinearity for hooks (algorithms/diagnostics/plasticity.py)
    width_factor = 2

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


_ACTIVATIONS["crelu"] = CReLU


def make_activation(name: str, *, dim: int = -1) -> nn.Module:
    """The activation module ``name``; ``dim`` is the feature/channel axis (used by crelu only)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"network.activation: unknown value {name!r}; allowed: {sorted(_ACTIVATIONS)}")
    return CReLU(dim) if name == "crelu" else _ACTIVATIONS[name]()


def width_factor(activation: str) -> int:
    """How many features the activation hands on per unit: 2 for crelu, else 1."""
    return 2 if activation == "crelu" else 1


def make_norm(kind: str, shape: int | Sequence[int]) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "layer":
        return nn.LayerNorm(shape)
    if kind == "rms":
        return RMSNorm(shape)
    raise ValueError(f"network.norm: unknown value {kind!r}; allowed: ['layer', 'none', 'rms']")


class HiddenBlock(nn.Sequential):
    """layer -> norm -> act. ``layer`` has no bias when ``norm`` is a LayerNorm or RMSNorm.

    An nn.Sequential with children named ``layer``, ``norm``, ``act``, so structural tools that look
    for "weight layer followed by a norm" inside a Sequential find the normalised layers.
    """

    layer: nn.Module
    norm: nn.Module
    act: nn.Module

    def __init__(self, layer: nn.Module, norm: nn.Module, act: nn.Module):
        super().__init__(OrderedDict([("layer", layer), ("norm", norm), ("act", act)]))


class Network(nn.Module):
    """Base of the networks built here: hidden blocks (optionally after conv blocks), then an output."""

    blocks: nn.ModuleList
    output: nn.Linear | None
    out_features: int

    def _all_blocks(self) -> list[tuple[str, HiddenBlock]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, HiddenBlock)]

    def named_hidden_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, Linear/Conv2d) of every hidden block, input side first."""
        return [(f"{n}.layer", b.layer) for n, b in self._all_blocks()]

    def hidden_layers(self) -> list[nn.Module]:
        return [m for _, m in self.named_hidden_layers()]

    def named_norm_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, norm) of every hidden block that has a LayerNorm or RMSNorm."""
        return [(f"{n}.norm", b.norm) for n, b in self._all_blocks() if not isinstance(b.norm, nn.Identity)]

    def norm_layers(self) -> list[nn.Module]:
        return [m for _, m in self.named_norm_layers()]

    def named_activations(self) -> list[tuple[str, nn.Module]]:
        """(name, activation module) of every hidden block: hook these to read hidden features."""
        return [(f"{n}.act", b.act) for n, b in self._all_blocks()]

    def normalised_layers(self) -> list[str]:
        """Names of the hidden layers followed by a LayerNorm/RMSNorm (scale-invariant in their weight)."""
        return [f"{n}.layer" for n, b in self._all_blocks() if not isinstance(b.norm, nn.Identity)]

    def output_layer(self) -> nn.Linear | None:
        return self.output


class MLP(Network):
    """x [B, in_dim] -> hidden blocks -> output Linear [B, out_dim] (or the last hidden features)."""

    def __init__(self, in_dim: int, out_dim: int | None, cfg: NetworkConfig):
        super().__init__()
        self.blocks = _dense_blocks(in_dim, cfg)
        width = cfg.hidden[-1] * width_factor(cfg.activation) if cfg.hidden else in_dim
        self.output = nn.Linear(width, out_dim) if out_dim is not None else None
        self.out_features = out_dim if out_dim is not None else width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.output(x) if self.output is not None else x


class CNN(Network):
    """x [B, H, W, C] (channels-last) -> conv blocks -> flatten -> hidden blocks -> output Linear."""

    def __init__(self, obs_shape: Sequence[int], out_dim: int | None, cfg: NetworkConfig):
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(f"build_cnn: obs_shape must be [H, W, C] (channels-last), got {list(obs_shape)}")
        cnn = cfg.cnn if cfg.cnn is not None else CNNConfig()
        h, w, c = (int(s) for s in obs_shape)
        layers = list(zip(cnn.channels, cnn.per_layer("kernel"), cnn.per_layer("stride")))
        self.convs, flat = _conv_blocks((c, h, w), layers, cfg, "network.cnn", obs_shape)
        _dense_head(self, flat, out_dim, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W] for Conv2d
        return _conv_dense_forward(self, x)


def _conv_dense_forward(net: Network, x: torch.Tensor) -> torch.Tensor:
    """conv blocks -> flatten -> dense blocks -> output Linear (or the last hidden features), x [B, C, H, W]."""
    for block in net.convs:
        x = block(x)
    x = x.flatten(1)
    for block in net.blocks:
        x = block(x)
    return net.output(x) if net.output is not None else x


NATURE_CNN_CONVS: tuple[tuple[int, int, int], ...] = ((32, 8, 4), (64, 4, 2), (64, 3, 1))
"""(out channels, kernel, stride) of the Nature-DQN conv layers (Mnih et al. 2015, Methods)."""


class NatureCNN(Network):
    """The Nature-DQN torso (Mnih et al. 2015): x [B, C, H, W] pixel intensities in [0, 255] (uint8 or float),
    channels-first as ``ale/<Game>`` stacks them ([4, 84, 84]) ->

        x / 255 -> conv 32 8x8 s4 -> conv 64 4x4 s2 -> conv 64 3x3 s1 -> flatten -> dense ``cfg.hidden``
        ([512] by default) -> output Linear (or the last hidden features)

    each conv and dense layer a block ``layer -> norm -> act`` (ReLU in the paper; ``cfg.activation``). On
    [4, 84, 84] the conv maps are 32x20x20, 64x9x9, 64x7x7 (3136 features); the torso has
    (4·8·8·32 + 32) + (32·4·4·64 + 64) + (64·3·3·64 + 64) + (3136·512 + 512) = 1,684,128 parameters without norms.
    """

    def __init__(self, obs_shape: Sequence[int], out_dim: int | None, cfg: NetworkConfig):
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(f"network.encoder nature_cnn: observations must be images [C, H, W] (channels-first, "
                             f"e.g. ale/<Game>'s [4, 84, 84]); got shape {list(obs_shape)}")
        self.convs, flat = _conv_blocks(tuple(int(s) for s in obs_shape), NATURE_CNN_CONVS, cfg,
                                        "network.encoder nature_cnn", obs_shape)
        _dense_head(self, flat, out_dim, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.convs[0].layer.weight.dtype) * (1.0 / 255.0)
        return _conv_dense_forward(self, x)


def _conv_blocks(
    chw: tuple[int, int, int], layers: Sequence[tuple[int, int, int]], cfg: NetworkConfig, key: str,
    obs_shape: Sequence[int],
) -> tuple[nn.ModuleList, int]:
    """Conv blocks ``conv -> norm over [C, H, W] -> act`` for (out channels, kernel, stride) ``layers`` on a
    [C, H, W] input (no padding: H' = floor((H − k) / s) + 1); returns them and the flattened output size."""
    c, h, w = chw
    convs = []
    for out_c, k, s in layers:
        h, w = (h - k) // s + 1, (w - k) // s + 1
        if h < 1 or w < 1:
            raise ValueError(f"{key}: kernel {k} / stride {s} too large for input {list(obs_shape)}")
        conv = nn.Conv2d(c, out_c, k, stride=s, bias=cfg.norm == "none")
        act = make_activation(cfg.activation, dim=1)  # channels of [B, C, H, W]
        convs.append(HiddenBlock(conv, make_norm(cfg.norm, (out_c, h, w)), act))
        c = out_c * width_factor(cfg.activation)
    return nn.ModuleList(convs), c * h * w


def _dense_head(net: Network, in_dim: int, out_dim: int | None, cfg: NetworkConfig) -> None:
    """The dense blocks ``cfg.hidden`` and the output Linear of a conv torso (``out_dim=None``: no output)."""
    net.blocks = _dense_blocks(in_dim, cfg)
    width = cfg.hidden[-1] * width_factor(cfg.activation) if cfg.hidden else in_dim
    net.output = nn.Linear(width, out_dim) if out_dim is not None else None
    net.out_features = out_dim if out_dim is not None else width


def _dense_blocks(in_dim: int, cfg: NetworkConfig) -> nn.ModuleList:
    blocks = []
    for width in cfg.hidden:
        linear = nn.Linear(in_dim, width, bias=cfg.norm == "none")
        blocks.append(HiddenBlock(linear, make_norm(cfg.norm, width), make_activation(cfg.activation)))
        in_dim = width * width_factor(cfg.activation)
    return nn.ModuleList(blocks)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Initialise under an explicit seed without touching the caller's global RNG stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_mlp(in_dim: int, out_dim: int | None, cfg: NetworkConfig, *, seed: int | None = None) -> MLP:
    """An MLP ``in_dim -> cfg.hidden -> out_dim``; ``out_dim=None`` gives a torso without output layer.

    Weights use torch's default initialisation, drawn from ``seed`` when given (global RNG untouched).
    """
    with _seeded(seed):
        return MLP(in_dim, out_dim, cfg)


def build_cnn(obs_shape: Sequence[int], out_dim: int | None, cfg: NetworkConfig, *, seed: int | None = None) -> CNN:
    """A CNN for channels-last images [H, W, C]: ``cfg.cnn`` conv blocks, then ``cfg.hidden``, then out."""
    with _seeded(seed):
        return CNN(obs_shape, out_dim, cfg)


def build_nature_cnn(
    obs_shape: Sequence[int], out_dim: int | None, cfg: NetworkConfig, *, seed: int | None = None
) -> NatureCNN:
    """The Nature-DQN torso for channels-first pixel stacks [C, H, W], then ``cfg.hidden``, then out."""
    with _seeded(seed):
        return NatureCNN(obs_shape, out_dim, cfg)


def build_network(
    obs_shape: Sequence[int], out_dim: int | None, cfg: NetworkConfig, *, seed: int | None = None
) -> Network:
    """The block's encoder: ``nature_cnn`` -> build_nature_cnn; ``auto`` -> build_mlp for flat observations
    [D], build_cnn for images [H, W, C]."""
    if cfg.encoder == "nature_cnn":
        return build_nature_cnn(obs_shape, out_dim, cfg, seed=seed)
    if len(obs_shape) == 1:
        return build_mlp(int(obs_shape[0]), out_dim, cfg, seed=seed)
    if len(obs_shape) == 3:
        return build_cnn(obs_shape, out_dim, cfg, seed=seed)
    raise ValueError(
        f"network: observations of shape {list(obs_shape)} are not supported; allowed: [D] (MLP) or "
        "[H, W, C] (CNN)"
    )


def trainable_networks(module: nn.Module) -> list[tuple[str, Network]]:
    """The outermost :class:`Network` submodules of ``module`` whose parameters require gradients.

    Target networks (frozen copies) are skipped: they follow their online network.
    """
    found: list[tuple[str, Network]] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, Network):
            continue
        if any(name.startswith(p + ".") for p, _ in found if p):
            continue
        if any(p.requires_grad for p in sub.parameters()):
            found.append((name, sub))
    return found


def named_hidden_activations(module: nn.Module) -> dict[str, nn.Module]:
    """Activation modules of every trainable :class:`Network` inside ``module``, by qualified name."""
    return {
        f"{prefix}.{name}" if prefix else name: act
        for prefix, net in trainable_networks(module)
        for name, act in net.named_activations()
    }
