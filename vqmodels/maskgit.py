"""Stage two: MaskGIT (Chang et al. 2022), a bidirectional transformer over a tokenizer's token grid.

Vocabulary of the input embedding: codes 0..K-1, the mask token K, then (class-conditional models only)
class tokens K+1..K+C and the null class K+C+1 used for classifier-free guidance. The output head predicts
codes only (K logits), so a mask or class id can never be sampled. Training masks ⌈γ(r)·N⌉ tokens per
sample (r ~ U(0, 1)) and scores masked positions only; `generate` is MaskGIT's iterative parallel decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vqmodels.config import FromDict, SavesConfig
from vqmodels.layers import Transformer, init_weights

Schedule = Literal["cosine", "linear", "square"]
SCHEDULES = ("cosine", "linear", "square")


def gamma(r: torch.Tensor | float, schedule: Schedule = "cosine") -> torch.Tensor:
    """Fraction of tokens masked at progress r ∈ [0, 1]: γ(0) = 1 (all masked), γ(1) = 0."""
    r = torch.as_tensor(r, dtype=torch.float64)
    if schedule == "cosine":
        return torch.cos(r * math.pi / 2)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "square":
        return 1.0 - r**2
    raise ValueError(f"schedule: {schedule!r} is not one of {list(SCHEDULES)}")


def decoding_schedule(num_tokens: int, steps: int, schedule: Schedule = "cosine") -> list[int]:
    """Tokens still masked after each of `steps` iterations: floor(γ((t+1)/T)·N), forced strictly decreasing
    (at least one token fixed per iteration) and 0 after the last, so decoding takes exactly `steps`."""
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps: must be in [1, {num_tokens}] (one token at least per step), got {steps}")
    counts, prev = [], num_tokens
    for t in range(steps):
        left = int(math.floor(float(gamma((t + 1) / steps, schedule)) * num_tokens))
        left = max(min(left, prev - 1), steps - 1 - t)  # keep >= one token for each remaining step
        counts.append(left)
        prev = left
    return counts


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over masked positions only; unmasked positions contribute nothing (nor gradient)."""
    return F.cross_entropy(logits[mask], targets[mask], label_smoothing=label_smoothing)


@dataclass
class MaskGITConfig(FromDict):
    """Size and training settings of a `MaskGIT`; stored in every checkpoint."""

    codebook_size: int = 1024  # K of the tokenizer it models
    grid_size: tuple[int, int] = (16, 16)  # (h, w) of the token grid
    num_classes: int = 0  # 0 = unconditional
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    schedule: Schedule = "cosine"  # γ for both training masks and decoding
    label_smoothing: float = 0.1
    class_dropout: float = 0.1  # training: probability a label becomes the null class (for guidance)

    def __post_init__(self) -> None:
        g = self.grid_size
        self.grid_size = (int(g), int(g)) if isinstance(g, int) else tuple(int(v) for v in g)  # type: ignore[assignment]
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(f"grid_size: expected (h, w) >= 1, got {g}")
        for name in ("codebook_size", "dim", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"heads: dim {self.dim} is not divisible by heads {self.heads}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes: must be >= 0, got {self.num_classes}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {list(SCHEDULES)}")
        for name in ("dropout", "label_smoothing", "class_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @classmethod
    def debug(cls, **overrides: Any) -> MaskGITConfig:
        """A tiny model over the debug tokenizer's 8×8 grid of 64 codes, for tests."""
        base: dict[str, Any] = dict(codebook_size=64, grid_size=(8, 8), dim=32, depth=2, heads=2, dropout=0.0)
        return cls(**{**base, **overrides})


class MaskGITOutput(NamedTuple):
    loss: torch.Tensor  # masked-token cross-entropy (backward this)
    logits: torch.Tensor  # (B, N, K)
    mask: torch.Tensor  # (B, N) bool, True where the input was the mask token
    metrics: dict[str, torch.Tensor]  # "accuracy" (on masked positions), "mask_ratio"


class MaskGIT(SavesConfig, nn.Module):
    """Bidirectional transformer over the flattened token grid (raster order)."""

    def __init__(self, config: MaskGITConfig):
        super().__init__()
        c = self.config = config
        self.mask_id = c.codebook_size
        self.null_class = c.codebook_size + 1 + c.num_classes  # only used when num_classes > 0
        vocab = c.codebook_size + 1 + (c.num_classes + 1 if c.num_classes else 0)
        self.prefix = 1 if c.num_classes else 0
        self.tok_emb = nn.Embedding(vocab, c.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, c.num_tokens + self.prefix, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.transformer = Transformer(c.dim, c.depth, c.heads, c.mlp_ratio, c.dropout)
        self.head = nn.Linear(c.dim, c.codebook_size)
        init_weights(self)
        nn.init.trunc_normal_(self.pos_emb, std=0.02, a=-0.04, b=0.04)

    # -- core -----------------------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, N, dim) for inputs (B, N) or (B, h, w) holding codes or the mask id.

        `labels` (B,) class indices, -1 meaning the null class; None means null for all (conditional models)
        and is required for unconditional ones.
        """
        tokens = tokens.reshape(tokens.shape[0], -1)
        if tokens.shape[1] != self.config.num_tokens:
            raise ValueError(f"tokens: expected {self.config.num_tokens} tokens per sample, got {tokens.shape[1]}")
        x = self.tok_emb(tokens)
        if self.prefix:
            x = torch.cat([self.tok_emb(self._class_ids(labels, tokens.shape[0], tokens.device))[:, None], x], 1)
        elif labels is not None:
            raise ValueError("labels: this MaskGIT is unconditional (num_classes = 0)")
        return self.transformer(self.drop(x + self.pos_emb))[:, self.prefix :]

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, N, K) over the codebook (see `hidden` for the arguments)."""
        return self.head(self.hidden(tokens, labels))

    def _class_ids(self, labels: torch.Tensor | int | None, batch: int, device: torch.device) -> torch.Tensor:
        c = self.config
        if labels is None:
            return torch.full((batch,), self.null_class, device=device, dtype=torch.long)
        labels = torch.as_tensor(labels, device=device, dtype=torch.long)
        if labels.dim() == 0:
            labels = labels.expand(batch)
        if labels.shape != (batch,) or int(labels.max()) >= c.num_classes or int(labels.min()) < -1:
            raise ValueError(f"labels: expected ({batch},) class indices in [-1, {c.num_classes}), got {labels.tolist()}")
        return torch.where(labels < 0, self.null_class, c.codebook_size + 1 + labels)

    def mask_tokens(
        self, tokens: torch.Tensor, r: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample draw r ~ U(0, 1) (or take `r`), mask ⌈γ(r)·N⌉ random positions.

        Returns (inputs, mask): inputs (B, N) with the mask id at masked positions, mask (B, N) bool.
        """
        tokens = tokens.reshape(tokens.shape[0], -1)
        b, n = tokens.shape
        if r is None:
            r = torch.rand(b, generator=generator, device=tokens.device)
        counts = torch.ceil(gamma(r, self.config.schedule) * n).long().clamp(1, n).to(tokens.device)
        scores = torch.rand(b, n, generator=generator, device=tokens.device)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        mask = ranks < counts[:, None]
        return torch.where(mask, torch.full_like(tokens, self.mask_id), tokens), mask

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MaskGITOutput:
        """Training step on token grids (B, h, w): mask, predict, cross-entropy on masked positions only.

        In training mode each label becomes the null class with probability `class_dropout`.
        """
        c = self.config
        targets = tokens.reshape(tokens.shape[0], -1).long()
        if int(targets.min()) < 0 or int(targets.max()) >= c.codebook_size:
            raise ValueError(f"tokens: codes must lie in [0, {c.codebook_size})")
        inputs, mask = self.mask_tokens(targets, r=r, generator=generator)
        if labels is not None and self.prefix and self.training and c.class_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < c.class_dropout
            labels = torch.where(drop, -1, labels)
        logits = self.logits(inputs, labels)
        loss = masked_cross_entropy(logits, targets, mask, c.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets)[mask].float().mean()
        return MaskGITOutput(loss, logits, mask, {"accuracy": acc, "mask_ratio": mask.float().mean()})

    # -- sampling -------------------------------------------------------------------------------------
    def _guided_logits(
        self, tokens: torch.Tensor, labels: torch.Tensor | None, guidance: float, positions: torch.Tensor
    ) -> torch.Tensor:
        """Logits (n, m, K) at `positions` (n, m) only: cond + guidance·(cond − uncond).

        guidance 0 is exactly one conditional forward; otherwise cond and uncond share one batch of 2n.
        """
        n = tokens.shape[0]
        if guidance != 0.0:
            null = torch.full((n,), -1, device=tokens.device, dtype=torch.long)
            tokens, labels, positions = torch.cat([tokens, tokens]), torch.cat([labels, null]), positions.repeat(2, 1)
        h = self.hidden(tokens, labels)
        logits = self.head(h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))).float()
        if guidance == 0.0:
            return logits
        cond, uncond = logits[:n], logits[n:]
        return cond + guidance * (cond - uncond)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        steps: int = 8,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        labels: torch.Tensor | int | None = None,
        guidance: float = 0.0,
        generator: torch.Generator | None = None,
        return_history: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """MaskGIT decoding: start fully masked; each iteration samples every masked token, keeps the most
        confident ones and re-masks the rest per the schedule. Fixed tokens never change; all are fixed after
        exactly `steps` iterations. Returns codes (n, h, w) (and, with `return_history`, the grid after each
        iteration with the mask id at still-masked positions).

        temperature: of the token sampling (0 = argmax). choice_temperature: scale of the Gumbel noise on the
        confidence, annealed linearly to 0. labels: class(es) for conditional models (None = null class).
        guidance: classifier-free guidance scale (0 = no unconditional forward at all).
        """
        c = self.config
        device = self.pos_emb.device
        if guidance != 0.0 and not self.prefix:
            raise ValueError("guidance: needs a class-conditional MaskGIT (num_classes > 0)")
        label_ids = None
        if self.prefix:
            label_ids = torch.full((n,), -1, device=device, dtype=torch.long)
            if labels is not None:
                label_ids = torch.as_tensor(labels, device=device, dtype=torch.long).expand(n).clone()
        elif labels is not None:
            raise ValueError("labels: this MaskGIT is unconditional (num_classes = 0)")
        counts = decoding_schedule(c.num_tokens, steps, c.schedule)
        tokens = torch.full((n, c.num_tokens), self.mask_id, device=device, dtype=torch.long)
        # the masked positions (n, m): every sample has the same number m of masked tokens, so they are
        # tracked as indices (no nonzero(), which would wait for the GPU at every iteration)
        positions = torch.arange(c.num_tokens, device=device).expand(n, -1)
        history: list[torch.Tensor] = []
        was_training = self.training
        self.eval()
        try:
            for t, left in enumerate(counts):
                logits = self._guided_logits(tokens, label_ids, guidance, positions)
                sampled = sample_tokens(logits, temperature, generator)
                if left == 0:  # the last iteration fixes every remaining token: no ranking needed
                    tokens = tokens.scatter(1, positions, sampled)
                else:
                    logp = logits.gather(-1, sampled[..., None])[..., 0] - logits.logsumexp(-1)  # log p(sampled)
                    confidence = perturbed(logp, choice_temperature * (1.0 - (t + 1) / steps), generator)
                    still = confidence.argsort(dim=1)[:, :left]  # the `left` least confident stay masked
                    tokens = tokens.scatter(1, positions, sampled.scatter(1, still, self.mask_id))
                    positions = positions.gather(1, still)  # any order will do: no sort
                if return_history:
                    history.append(tokens.view(n, *c.grid_size).clone())
        finally:
            self.train(was_training)
        out = tokens.view(n, *c.grid_size)
        return (out, history) if return_history else out


def perturbed(logp: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """logp + scale·Gumbel noise, drawn as −scale·log(E) with E ~ Exp(1) (Gumbel = −log E): three kernels
    instead of the seven of −log(−log U), which matters when decoding is bound by kernel launches."""
    if scale == 0.0:
        return logp
    e = torch.empty_like(logp).exponential_(generator=generator)
    return logp.sub(e.log_(), alpha=scale)


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from softmax(logits / temperature) by inverse CDF (one uniform per row, not one
    Gumbel per logit: the K-wide noise dominated sampling time); temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    cdf = torch.softmax(logits, dim=-1).cumsum_(-1)
    u = torch.rand(logits.shape[:-1], device=logits.device, generator=generator)[..., None] * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True)[..., 0].clamp_max(logits.shape[-1] - 1)
