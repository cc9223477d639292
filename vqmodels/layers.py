"""Shared building blocks: VQGAN-style conv blocks for the tokenizer, transformer blocks for MaskGIT/AR.

The transformer here is used by both `MaskGIT` (bidirectional) and the autoregressive baseline (causal,
KV-cached), so the sampling benchmark compares decoding schemes, not architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels` (small debug widths)."""
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm → SiLU → conv → norm → SiLU → dropout → conv, plus a (1×1 when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual (used at the lowest resolution only: O((hw)^2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3×3 conv (learned downsampling keeps detail the average pool would blur)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then 3×3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------
# transformer


@dataclass
class KVCache:
    """Pre-allocated keys/values of one attention layer; `length` positions are filled."""

    k: torch.Tensor  # (B, heads, max_len, head_dim)
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, max_len: int, head_dim: int, like: torch.Tensor) -> KVCache:
        shape = (batch, heads, max_len, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape))


class SelfAttention(nn.Module):
    """Multi-head self-attention; `causal` for the AR baseline, optional KV cache for cached decoding."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if cache is not None:
            start = cache.length
            cache.k[:, :, start : start + t] = k
            cache.v[:, :, start : start + t] = v
            cache.length = start + t
            k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
            if causal and t > 1 and start > 0:  # a chunk after a prefix: query i sees keys <= start + i
                pos = torch.arange(cache.length, device=x.device)
                mask = pos[None, :] <= (start + torch.arange(t, device=x.device))[:, None]
                causal = False
            elif t == 1:
                causal = False  # one new query attends to the whole prefix
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), causal=causal, cache=cache))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A stack of `TransformerBlock`s and a final LayerNorm (embeddings and heads belong to the models)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def new_cache(self, batch: int, max_len: int, like: torch.Tensor) -> list[KVCache]:
        """One empty KV cache per block, for cached causal decoding of up to `max_len` positions."""
        return [KVCache.empty(batch, self.heads, max_len, self.head_dim, like) for _ in self.blocks]

    def forward(
        self, x: torch.Tensor, causal: bool = False, cache: list[KVCache] | None = None
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, causal=causal, cache=None if cache is None else cache[i])
        return self.norm(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal init for linear/embedding weights (BERT/MaskGIT style); zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
