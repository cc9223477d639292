"""A job's images from the data issue's loaders: the training batches (endless, positioned at a resume step,
with the ranks' skipped-sample count) and the eval split (every sample once across ranks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from jobs.worker import Worker, all_reduce_sum

SKIP_SYNC_EVERY = 50  # steps between sums of the ranks' skipped-sample counts


class TrainBatches:
    """Endless training batches over epochs, positioned at `start_step`.

    A resumed job sees the same data order as an uninterrupted one: it re-enters the epoch it was in at the
    batch it had reached. The loader skips the used part of the epoch before decoding anything, so even a
    resume deep into a long epoch costs only the reading of the skipped samples.
    """

    def __init__(self, loader: Any, start_step: int = 0, skipped_before: int = 0):
        self.loader = loader
        self.skipped_before = skipped_before  # all ranks' skipped samples up to the checkpoint resumed from
        self._skipped = skipped_before
        epoch, skip = divmod(start_step, len(loader))
        loader.set_epoch(epoch, skip_batches=skip)
        self._it = self._batches()

    def _batches(self) -> Iterator[Any]:
        while True:  # each full pass advances the loader's epoch (and ends any resume skip)
            yield from self.loader

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def sync_skipped(self, step: int, device: torch.device, at_checkpoint: bool) -> None:
        """Sum the ranks' skipped-sample counts every SKIP_SYNC_EVERY steps and at checkpoints. A collective:
        every rank calls it at every step (the condition depends on the step only)."""
        if step % SKIP_SYNC_EVERY and not at_checkpoint:
            return
        local = torch.tensor([float(self.loader.skipped)], dtype=torch.float64, device=device)
        self._skipped = self.skipped_before + int(all_reduce_sum(local).item())

    @property
    def skipped(self) -> int:
        """Samples skipped by all ranks since the job began (undecodable or lost in a broken shard), as of the
        last `sync_skipped`; saved in checkpoints, so a resumed job keeps counting."""
        return self._skipped


def image_loader(spec: Any, worker: Worker, train: bool) -> Any | None:
    """The data issue's per-rank image loader for `data.train` (train=True) or `data.eval` (None if unset);
    local shards must lie under the service's allowed roots when the job runs under the service."""
    from jobs.data.loader import make_image_loader
    from vqbase.protocol import allowed_roots_from_env

    d = spec.data
    source = d.train if train else d.eval
    if source is None:
        return None
    return make_image_loader(
        source,
        image_size=d.image_size,
        batch_size=spec.optim.batch_size,
        train=train,
        rank=worker.rank,
        world_size=worker.world_size,
        num_workers=d.num_workers,
        seed=spec.optim.seed,
        shuffle_buffer=d.shuffle_buffer,
        epoch_batches=d.epoch_batches if train else None,
        storage_options=d.storage_options,
        allowed_roots=allowed_roots_from_env(),
        pin_memory=worker.device.type == "cuda",
    )


def eval_batches(spec: Any, worker: Worker) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every eval sample exactly once across ranks (padding and undecodable samples dropped), or None
    without an eval split. Every rank gets the same number of batches, possibly empty ones."""
    loader = image_loader(spec, worker, train=False)
    if loader is None:
        return None
    return ((b.images[b.valid], b.labels[b.valid]) for b in loader)
