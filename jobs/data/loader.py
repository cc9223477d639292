"""The image loader the training jobs call: shards -> (images in [-1, 1], labels) batches per rank.

    loader = make_image_loader("s3://bucket/cifar/manifest.json", image_size=32, batch_size=128,
                               rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                               storage_options={"endpoint_url": ...})
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:      # exactly len(loader) batches on every rank
            ...
        metrics["data/skipped"] = loader.skipped

See `jobs.data.stream` for how equal batch counts and exact eval counts are guaranteed.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypedDict, Unpack

import numpy as np
import torch
from PIL import Image

from jobs.data.manifest import resolve_shards
from jobs.data.shards import IMAGE_EXTS
from jobs.data.stream import STAT_KEYS, ShardStream, dist_info


class Batch(NamedTuple):
    """images: float B×3×S×S in [-1, 1]; labels: long B (-1 marks padded/undecodable eval positions)."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """Bool mask of real samples (all True in training batches)."""
        return self.labels >= 0


class ImageDecoder:
    """Raw sample -> (3×S×S float tensor in [-1, 1], class id): shorter side to S, centre crop."""

    def __init__(self, image_size: int, random_flip: bool = False, require_label: bool = True):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.size, self.random_flip, self.require_label = image_size, random_flip, require_label

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, int]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image (jpg/jpeg/png/webp)")
        if "cls" in sample:
            label = int(sample["cls"])
            if label < 0:
                raise ValueError(f"negative class id {label}")
        elif self.require_label:
            raise ValueError(f"sample {sample.get('__key__')} has no cls")
        else:
            label = 0
        s = self.size
        im = Image.open(io.BytesIO(sample[ext]))  # in-memory: nothing to close
        if im.format == "JPEG":
            im.draft("RGB", (s, s))  # let libjpeg downscale large images while decoding
        if im.mode != "RGB":
            im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (s, s):
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (nw - s) // 2, (nh - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if self.random_flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.array(im, dtype=np.uint8)
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return x, label

    def placeholder(self) -> torch.Tensor:
        return torch.zeros(3, self.size, self.size)


def identity_collate(batch: Any) -> Any:
    """DataLoader collate for already-batched items (module level so workers can pickle it)."""
    return batch


class ShardLoader:
    """Iterable over (x, y) batches for one rank with exactly `len(self)` batches per epoch.

    Wraps ShardStream in a DataLoader, sums the per-batch stats from all workers into `self.stats`
    (`samples`, `skipped`, `bad_shards`, `retries`), and advances the epoch after each full pass.
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        num_workers: int = 2,
        timeout: float = 300.0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        make_batch: Callable[[torch.Tensor, torch.Tensor], Any] = lambda x, y: (x, y),
    ):
        self.stream, self.num_workers, self.timeout = stream, num_workers, timeout
        self.prefetch_factor, self.pin_memory, self.make_batch = prefetch_factor, pin_memory, make_batch
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    def __len__(self) -> int:
        """Batches of a full epoch (the first epoch of a resumed job yields fewer: `epoch_length`)."""
        return self.stream.batches_per_rank

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.stream.set_epoch(epoch, skip_batches)

    @property
    def skipped(self) -> int:
        """Samples skipped so far (undecodable, incomplete, or lost in an unreadable shard)."""
        return self.stats["skipped"]

    def __iter__(self) -> Iterator[Any]:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"timeout": self.timeout, "prefetch_factor": self.prefetch_factor}
        dl = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=identity_collate,
            pin_memory=self.pin_memory, **kwargs,
        )
        n = 0
        for item in dl:
            for k, v in item["stats"].items():
                self.stats[k] += v
            n += 1
            yield self.make_batch(item["x"], item["y"])
        if n != self.stream.epoch_length:
            raise RuntimeError(f"rank {self.stream.rank}: got {n} batches, expected {self.stream.epoch_length}")
        self.stream.set_epoch(self.stream.epoch + 1)


class LoaderOptions(TypedDict, total=False):
    """How a per-rank shard loader reads (`open_loader`); the defaults are `open_loader`'s."""

    train: bool  # True: endless resampled shards, shuffled, `epoch_batches` a pass; False: every sample once
    rank: int | None  # default: torch.distributed's
    world_size: int | None
    num_workers: int
    seed: int
    shuffle_buffer: int
    epoch_batches: int | None  # default: manifest samples // (world_size × batch_size)
    storage_options: dict[str, Any] | None
    allowed_roots: Sequence[str | os.PathLike] | None  # local paths must lie under these (the service's roots)
    retries: int
    timeout: float
    pin_memory: bool


def open_loader(
    source: str | Sequence[str],
    decoder: Callable[[dict[str, Any]], Any],
    make_batch: Callable[..., Any],
    *,
    batch_size: int,
    train: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    epoch_batches: int | None = None,
    storage_options: dict[str, Any] | None = None,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
    retries: int = 3,
    timeout: float = 300.0,
    pin_memory: bool = False,
) -> ShardLoader:
    """The per-rank loader of any sample type: `decoder(manifest meta)` makes the sample decoder, `make_batch`
    the batch tuple. Images and token grids share everything else (`jobs.data.stream`)."""
    rank, world_size = dist_info(rank, world_size)
    shards = resolve_shards(source, storage_options, allowed_roots)
    stream = ShardStream(
        shards,
        decoder(shards.manifest.meta if shards.manifest is not None else {}),
        batch_size=batch_size,
        train=train,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        epoch_batches=epoch_batches,
        storage_options=storage_options,
        retries=retries,
    )
    return ShardLoader(stream, num_workers=num_workers, timeout=timeout, pin_memory=pin_memory, make_batch=make_batch)


def make_image_loader(
    source: str | Sequence[str], *, image_size: int, batch_size: int, random_flip: bool = False,
    **options: Unpack[LoaderOptions],
) -> ShardLoader:
    """Build the per-rank image loader.

    source: a brace pattern (`s3://b/p/train-{000000..000009}.tar`), a list, a folder/prefix, or a
    `manifest.json`. train=True streams endlessly-resampled shards with a shuffle buffer and yields exactly
    `epoch_batches` batches (default: manifest samples // (world_size × batch_size)); train=False yields
    every sample once, split across ranks, padding marked by label -1. rank/world_size default to
    torch.distributed's. Iterating yields `Batch(images, labels)`; `loader.stats` / `loader.skipped`
    count skipped samples, unreadable shards and retries across all dataloader workers.
    """
    flip = random_flip and options.get("train", True)
    return open_loader(source, lambda meta: ImageDecoder(image_size, random_flip=flip), Batch,
                       batch_size=batch_size, **options)
