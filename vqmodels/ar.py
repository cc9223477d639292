"""Autoregressive baseline: the same transformer as MaskGIT, causal, decoding one token per step.

Exists for the sampling benchmark (bench/sampling.py): MaskGIT needs `steps` full forwards per image batch,
this model needs N cached single-token forwards. Input vocabulary: codes 0..K-1, then the start token of
each class K..K+C-1 and the null/unconditional start token K+C.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqmodels.config import FromDict, SavesConfig
from vqmodels.layers import Transformer, init_weights
from vqmodels.maskgit import MaskGITConfig, sample_tokens


@dataclass
class ARConfig(FromDict):
    """Size of an `ARTransformer`; `ARConfig.matching(maskgit_config)` gives the benchmark's twin."""

    codebook_size: int = 1024
    grid_size: tuple[int, int] = (16, 16)
    num_classes: int = 0
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    label_smoothing: float = 0.0
    class_dropout: float = 0.1

    def __post_init__(self) -> None:
        g = self.grid_size
        self.grid_size = (int(g), int(g)) if isinstance(g, int) else tuple(int(v) for v in g)  # type: ignore[assignment]
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"grid_size: expected (h, w) >= 1, got {g}")
        if self.dim % self.heads:
            raise ValueError(f"heads: dim {self.dim} is not divisible by heads {self.heads}")

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @classmethod
    def matching(cls, config: MaskGITConfig) -> ARConfig:
        """Same vocabulary, grid, width, depth, heads and MLP as the given MaskGIT."""
        shared = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dataclasses.asdict(config).items() if k in shared})

    @classmethod
    def debug(cls, **overrides: Any) -> ARConfig:
        return cls.matching(MaskGITConfig.debug(**overrides))


class AROutput(NamedTuple):
    loss: torch.Tensor  # next-token cross-entropy over all N positions
    logits: torch.Tensor  # (B, N, K)
    metrics: dict[str, torch.Tensor]


class ARTransformer(SavesConfig, nn.Module):
    """GPT-style raster-order model over token grids (VQGAN's stage two, without its sliding window)."""

    def __init__(self, config: ARConfig):
        super().__init__()
        c = self.config = config
        self.start_null = c.codebook_size + c.num_classes
        self.tok_emb = nn.Embedding(c.codebook_size + c.num_classes + 1, c.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, c.num_tokens, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.dim, c.depth, c.heads, c.mlp_ratio, c.dropout)
        self.head = nn.Linear(c.dim, c.codebook_size)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_emb, std=0.02, a=-0.04, b=0.04)

    def _start_ids(self, labels: torch.Tensor | int | None, batch: int, device: torch.device) -> torch.Tensor:
        c = self.config
        if labels is None:
            return torch.full((batch,), self.start_null, device=device, dtype=torch.long)
        if not c.num_classes:
            raise ValueError("labels: this model is unconditional (num_classes = 0)")
        labels = torch.as_tensor(labels, device=device, dtype=torch.long)
        if labels.dim() == 0:
            labels = labels.expand(batch)
        if labels.shape != (batch,) or int(labels.max()) >= c.num_classes or int(labels.min()) < -1:
            raise ValueError(f"labels: expected ({batch},) class indices in [-1, {c.num_classes})")
        return torch.where(labels < 0, self.start_null, c.codebook_size + labels)

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, N, K): position i sees the start token and tokens < i."""
        tokens = tokens.reshape(tokens.shape[0], -1)
        start = self._start_ids(labels, tokens.shape[0], tokens.device)
        inputs = torch.cat([start[:, None], tokens[:, :-1]], 1)
        h = self.transformer(self.drop(self.tok_emb(inputs) + self.pos_emb), causal=True)
        return self.head(h)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> AROutput:
        """Training step: next-token cross-entropy on token grids (B, h, w)."""
        c = self.config
        targets = tokens.reshape(tokens.shape[0], -1).long()
        if labels is not None and self.training and c.class_dropout > 0:
            labels = torch.where(torch.rand(labels.shape, device=labels.device) < c.class_dropout, -1, labels)
        logits = self.logits(targets, labels)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=c.label_smoothing)
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return AROutput(loss, logits, {"accuracy": acc})

    @torch.no_grad()
    def generate(
        self,
        n: int,
        temperature: float = 1.0,
        labels: torch.Tensor | int | None = None,
        guidance: float = 0.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample (n, h, w) codes one token at a time (N forwards; KV-cached unless `use_cache=False`)."""
        c = self.config
        device = self.pos_emb.device
        if guidance != 0.0 and not c.num_classes:
            raise ValueError("guidance: needs a class-conditional model (num_classes > 0)")
        start = self._start_ids(labels, n, device)
        if guidance != 0.0:
            start = torch.cat([start, torch.full_like(start, self.start_null)])
        b = start.shape[0]
        was_training = self.training
        self.eval()
        try:
            cache = self.transformer.new_cache(b, c.num_tokens, self.pos_emb) if use_cache else None
            seq = self.tok_emb(start)[:, None] + self.pos_emb[:, :1]
            out = torch.empty(n, c.num_tokens, device=device, dtype=torch.long)
            for i in range(c.num_tokens):
                if cache is not None:
                    h = self.transformer(seq[:, -1:], causal=True, cache=cache)
                else:
                    h = self.transformer(seq, causal=True)
                logits = self.head(h[:, -1]).float()
                if guidance != 0.0:
                    logits = logits[:n] + guidance * (logits[:n] - logits[n:])
                tok = sample_tokens(logits, temperature, generator)
                out[:, i] = tok
                if i + 1 < c.num_tokens:
                    nxt = self.tok_emb(tok.repeat(b // n))[:, None] + self.pos_emb[:, i + 1 : i + 2]
                    seq = nxt if cache is not None else torch.cat([seq, nxt], 1)
        finally:
            self.train(was_training)
        return out.view(n, *c.grid_size)
