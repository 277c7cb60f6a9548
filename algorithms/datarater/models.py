"""Small self-contained inner models and raters.

Attention is written out (``softmax(q kᵀ/√d + mask) v``) instead of calling
``scaled_dot_product_attention``: torch's fused attention kernels have no forward-mode AD, which the
MixFlow-MG engine needs (forward-over-reverse).

Shape letters: B batch, L sequence length, D model width, H heads, V vocabulary (256 bytes), F input
features, C classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """x[B, F] -> tanh/relu MLP -> [B, out]."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str = "tanh"):
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation={activation!r}: allowed values are {', '.join(acts)}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), acts[activation]()]
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with attention written out (math path, forward-mode AD capable)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, L, D/H]
        att = q @ k.transpose(-2, -1) / math.sqrt(D // H)
        if self.causal:
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf"))
        y = att.softmax(dim=-1) @ v  # [B, H, L, D/H]
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, causal: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class ByteTransformer(nn.Module):
    """Byte-level transformer. Causal: tokens[B, L] -> next-byte logits [B, L, V].

    Non-causal with ``out_dim=1`` and mean pooling: tokens[B, L] -> one score per sequence [B] (the
    text rater).
    """

    def __init__(
        self, d_model: int = 64, n_heads: int = 2, n_layers: int = 2, d_ff: int = 128, max_len: int = 128,
        vocab: int = 256, causal: bool = True, pooled_score: bool = False,
    ):
        super().__init__()
        self.pooled_score = pooled_score
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, causal) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1 if pooled_score else vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        L = tokens.shape[1]
        x = self.tok(tokens) + self.pos[:L]
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        if self.pooled_score:
            return self.head(x.mean(dim=1)).squeeze(-1)
        return self.head(x)


def lm_per_example_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-byte cross-entropy per sequence: ℓ_b = −1/(L−1) Σ_t log p(x_{t+1} | x_≤t). logits[B, L, V]."""
    lp = F.log_softmax(logits[:, :-1], dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, L-1]
    return nll.mean(dim=1)


def classification_per_example_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """ℓ_b = −log softmax(logits_b)[y_b]. logits[B, C], labels[B]."""
    return F.cross_entropy(logits, labels, reduction="none")
