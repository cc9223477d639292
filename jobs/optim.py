"""The optimiser's side of a training step: the learning-rate schedule (`lr_factor`, `set_lr`) and mixed
precision (`Precision`: autocast, gradient scaling, clipping and the step itself)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant or cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's `base_lr` (set when the optimiser is built), keeping per-group multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


class Precision:
    """Autocast and gradient scaling for the spec's `optim.precision` (fp32 | bf16 | fp16)."""

    def __init__(self, precision: str, device: torch.device):
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        grad_clip: float | None,
        sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    ) -> float | torch.Tensor:
        """zero_grad, backward, (sync gradients,) unscale, clip and step; returns the gradient norm
        before clipping (0 when clipping is off), as a device tensor: reading it here would make every
        step wait for the GPU."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if sync is not None:
            sync(params)
        norm = 0.0
        if grad_clip:
            self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).detach()
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm
