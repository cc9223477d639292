"""Where a training process sits in its job, and what it shares with the other ranks: the worker's rank and
device, seeding and RNG state, DDP and the job's own collectives.

`is_distributed` is the one test, for all of `jobs`, of whether collectives are needed at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Worker:
    """Where this training process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def worker_context(cpus_per_worker: int = 1) -> Worker:
    """Rank, world size and device of the calling Ray Train worker (single process outside Ray Train)."""
    import ray  # here, not at the top: the data loaders use `is_distributed` without Ray

    try:
        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    except Exception:  # not inside a Ray Train worker (benchmarks, debugging)
        rank, world, local = 0, 1, 0
    torch.set_num_threads(max(1, int(cpus_per_worker)))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Worker(rank, world, local, device)


def is_distributed() -> bool:
    """Whether this process is one of several ranks of a torch.distributed process group (initialised, world
    size above one): the jobs' one "am I distributed" test. Without it (no group, or a group of one) every
    collective is the identity and rank/world size are 0/1, so callers skip the collectives."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; ranks get different streams so their data augmentation differs."""
    s = int(seed) * 1000 + int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """All RNG states of this process, for the checkpoint (a resumed job continues the same streams)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------- collectives


def wrap_ddp(model: torch.nn.Module, worker: Worker, ignore_prefix: str | None = None) -> torch.nn.Module:
    """DDP that syncs buffers once, at construction, but not before every forward: the quantizer keeps its
    buffers (EMA statistics, usage, running affine) identical across ranks through its own collectives.

    Parameters and buffers under `ignore_prefix` (e.g. "discriminator.") are left out of DDP; the
    caller syncs them itself (`average_gradients`).
    """
    model = model.to(worker.device)
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ignore_prefix:
        names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()] if n.startswith(ignore_prefix)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)

    ids = [worker.device.index] if worker.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=False)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process); used to pool eval statistics."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (one process: [obj])."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over ranks in one flat all-reduce, for a module trained outside DDP
    (the tokenizer's discriminator, whose parameters the generator's DDP ignores)."""
    if not is_distributed():
        return
    for p in params:  # every rank must contribute the same layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
