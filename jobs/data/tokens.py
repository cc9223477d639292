"""Token shards for stage two: a trained tokenizer encodes a dataset once, MaskGIT trains on the codes.

Sample layout (webdataset-compatible): `KEY.tokens.npy` (the H×W code grid, int16 when the codebook
fits, else int32) and `KEY.cls`. The manifest's `meta` records grid, dtype, codebook size and tokenizer,
so a reader can check it got what it expects. The reader reuses the image loader's streaming scheme:
equal batch counts per rank, resampled shards, exact eval.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from jobs.data import storage
from jobs.data.manifest import Manifest, resolve_shards
from jobs.data.stream import ShardLoader, ShardStream, dist_info
from jobs.data.tario import TarShardWriter

TOKENS_EXT = "tokens.npy"


class TokenBatch(NamedTuple):
    """tokens: long B×H×W; labels: long B (-1 marks padded/undecodable eval positions)."""

    tokens: torch.Tensor
    labels: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.labels >= 0


def token_dtype(codebook_size: int) -> np.dtype:
    """int16 while every code fits (halves storage), else int32."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be positive, got {codebook_size}")
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


class TokenShardWriter:
    """Write (token grid, cls) samples into tar shards + manifest at `dest` (local folder or s3://)."""

    def __init__(
        self,
        dest: str,
        *,
        codebook_size: int,
        name: str = "tokens",
        per_shard: int = 10000,
        storage_options: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        class_names: Sequence[str] = (),
        meta: dict[str, Any] | None = None,
    ):
        self.codebook_size, self.dtype = codebook_size, token_dtype(codebook_size)
        self.tokenizer, self.class_names, self.meta = tokenizer, list(class_names), dict(meta or {})
        self.grid: tuple[int, ...] | None = None
        self._next_key = 0
        self._writer = TarShardWriter(dest, name=name, per_shard=per_shard, storage_options=storage_options)

    def write(self, tokens: Any, cls: int, key: str | None = None) -> None:
        """One H×W grid of codes in [0, codebook_size) and its class id; keys default to a running number."""
        arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got {arr.dtype}")
        if self.grid is None:
            self.grid = tuple(arr.shape)
        elif tuple(arr.shape) != self.grid:
            raise ValueError(f"token grid {tuple(arr.shape)} differs from the first sample's {self.grid}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{arr.min()}, {arr.max()}]")
        buf = io.BytesIO()
        np.save(buf, arr.astype(self.dtype), allow_pickle=False)
        if key is None:
            key = f"{self._next_key:09d}"
            self._next_key += 1
        self._writer.write({"__key__": key, TOKENS_EXT: buf.getvalue(), "cls": int(cls)})

    def write_batch(self, tokens: Any, labels: Any) -> None:
        """A B×H×W batch with B labels."""
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        for t, c in zip(tokens, labels, strict=True):
            self.write(t, c)

    def close(self) -> Manifest:
        """Finish the last shard and write manifest.json (kind "tokens")."""
        meta = {
            **self.meta,
            "grid": list(self.grid or []),
            "dtype": self.dtype.name,
            "codebook_size": self.codebook_size,
            "tokenizer": self.tokenizer,
        }
        return self._writer.close(Manifest(name=self._writer.name, kind="tokens",
                                           class_names=self.class_names, meta=meta))

    def abort(self) -> None:
        """Give up: close the shard being written and delete every shard this writer produced, writing
        no manifest, so a failed run leaves nothing a reader could mistake for (part of) a shard set."""
        self._writer.abort()
        for shard in self._writer.shards:
            url = storage.join_url(self._writer.dest, shard.url)
            with contextlib.suppress(FileNotFoundError):
                storage.remove(url, self._writer.storage_options)
        self._writer.shards.clear()

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenDecoder:
    """Raw sample -> (long H×W codes, class id); checks the grid and code range when they are known."""

    def __init__(self, grid: Sequence[int] | None = None, codebook_size: int | None = None):
        self.grid = tuple(grid) if grid else None
        self.codebook_size = codebook_size

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, int]:
        data = sample.get(TOKENS_EXT, sample.get("npy"))
        if data is None:
            raise ValueError(f"sample {sample.get('__key__')} has no {TOKENS_EXT}")
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if self.grid is not None and tuple(arr.shape) != self.grid:
            raise ValueError(f"token grid {arr.shape} != {self.grid}")
        if self.codebook_size is not None and arr.size and (arr.min() < 0 or arr.max() >= self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        label = int(sample["cls"]) if "cls" in sample else 0
        return torch.from_numpy(arr.astype(np.int64)), label

    def placeholder(self) -> torch.Tensor:
        if self.grid is None:
            raise ValueError("eval over token shards needs the grid in the manifest")
        return torch.zeros(self.grid, dtype=torch.long)


def make_token_loader(
    source: str | Sequence[str],
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
) -> ShardLoader:
    """Per-rank loader of `TokenBatch(tokens, labels)` with the same guarantees as make_image_loader."""
    rank, world_size = dist_info(rank, world_size)
    shards = resolve_shards(source, storage_options, allowed_roots)
    meta = shards.manifest.meta if shards.manifest is not None else {}
    stream = ShardStream(
        shards,
        TokenDecoder(meta.get("grid"), meta.get("codebook_size")),
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
    return ShardLoader(stream, num_workers=num_workers, timeout=timeout, make_batch=TokenBatch)


def encode_to_token_shards(
    encode: Callable[[torch.Tensor], torch.Tensor],
    image_source: str | Sequence[str],
    dest: str,
    *,
    image_size: int,
    codebook_size: int,
    batch_size: int = 256,
    per_shard: int = 10000,
    num_workers: int = 2,
    storage_options: dict[str, Any] | None = None,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
    tokenizer: str | None = None,
) -> Manifest:
    """Run `encode` (images B×3×S×S in [-1, 1] -> codes B×H×W) over every image once; write token shards.

    Undecodable images are left out (and counted in the manifest's meta["skipped"]).
    """
    from jobs.data.loader import make_image_loader

    loader = make_image_loader(
        image_source, image_size=image_size, batch_size=batch_size, train=False, rank=0, world_size=1,
        num_workers=num_workers, storage_options=storage_options, allowed_roots=allowed_roots,
    )
    src = loader.stream.shards.manifest
    writer = TokenShardWriter(
        dest, codebook_size=codebook_size, per_shard=per_shard, storage_options=storage_options,
        tokenizer=tokenizer, class_names=src.class_names if src else (),
        meta={"image_size": image_size, "source": str(image_source)},
    )
    with torch.no_grad():
        for batch in loader:
            keep = batch.valid
            if keep.any():
                writer.write_batch(encode(batch.images[keep]), batch.labels[keep])
    writer.meta["skipped"] = loader.skipped
    return writer.close()
