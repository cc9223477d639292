"""Collectives used by the quantizer to keep every rank's codebook identical.

Each helper is a no-op without an initialised process group, so the layer runs unchanged on one
device. Callers must reach every collective on every rank in the same order: decisions that
guard a collective are taken from globally reduced values only, never from local data.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

_timer: Callable[[float], None] | None = None  # told the seconds each collective took (None: not timed)


def set_collective_timer(timer: Callable[[float], None] | None) -> None:
    """Inject a function that receives the seconds each of these collectives took (a training loop's measure
    of how long keeping the codebook in sync costs); None stops the timing."""
    global _timer
    _timer = timer


def _timed(fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        if _timer is None:
            return fn(*args, **kwargs)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _timer(time.perf_counter() - t)

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = fn.__name__, fn.__doc__, fn
    return wrapper


def group_initialized() -> bool:
    """A torch.distributed process group exists (even of one rank: collectives then run, as no-ops). The jobs'
    `jobs.worker.is_distributed` asks more: initialised and over one rank."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if group_initialized() else 1


def rank() -> int:
    return dist.get_rank() if group_initialized() else 0


@_timed
def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max); returns t for chaining."""
    if group_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


@_timed
def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from `src`; returns t."""
    if group_initialized():
        dist.broadcast(t, src=src)
    return t


@_timed
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a (n_r, d) tensor from every rank (n_r may differ, 0 included), in rank order."""
    if not group_initialized():
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    longest = max(sizes_l)
    if longest == 0:
        return x[:0]
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes_l]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_l, strict=True)])
