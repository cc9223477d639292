"""Token shards for stage two: a trained tokenizer encodes a dataset once, MaskGIT trains on the codes.

Sample layout (webdataset-compatible): `KEY.tokens.npy` (the H×W code grid, int16 when the codebook
fits, else int32) and `KEY.cls`. The manifest's `meta` records grid, dtype, codebook size and tokenizer,
so a reader can check it got what it expects. The reader reuses the image loader's streaming scheme:
equal batch counts per rank, resampled shards, exact eval.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Unpack

import numpy as np
import torch

from jobs.data import storage
from jobs.data.loader import Batch, LoaderOptions, ShardLoader, open_loader
from jobs.data.manifest import Manifest
from jobs.data.tario import TarShardWriter

TOKENS_EXT = "tokens.npy"


class TokenBatch(NamedTuple):
    """tokens: long B×H×W; labels: long B (-1 marks padded/undecodable eval positions)."""

    tokens: torch.Tensor
    labels: torch.Tensor

    valid = Batch.valid  # bool mask of real samples


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


def make_token_loader(source: str | Sequence[str], *, batch_size: int, **options: Unpack[LoaderOptions]) -> ShardLoader:
    """Per-rank loader of `TokenBatch(tokens, labels)` with the same guarantees and options as
    `make_image_loader`; the manifest's grid and codebook size check every sample."""
    return open_loader(source, lambda meta: TokenDecoder(meta.get("grid"), meta.get("codebook_size")), TokenBatch,
                       batch_size=batch_size, **options)


def encode_images(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Any,
    source: str | Sequence[str],
    dest: str,
    *,
    codebook_size: int,
    image_size: int,
    per_shard: int = 10000,
    storage_options: dict[str, Any] | None = None,
    tokenizer: str | None = None,
    key_prefix: str = "",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[Manifest, int]:
    """Run `encode` (images B×3×S×S in [-1, 1] -> codes B×H×W) over every valid image of an eval-mode image
    `loader` once and write token shards + manifest at `dest`: (the manifest, samples written).

    Undecodable images are left out and counted in the manifest's meta["skipped"]; on any error every shard
    written so far is deleted and no manifest is written. `on_batch(batches done, samples written)` reports
    progress; keys are `key_prefix` + a running number (the tokenize job prefixes its rank)."""
    src = loader.stream.shards.manifest
    writer = TokenShardWriter(
        dest, codebook_size=codebook_size, name="tokens", per_shard=per_shard, storage_options=storage_options,
        tokenizer=tokenizer, class_names=src.class_names if src is not None else (),
        meta={"image_size": image_size, "source": str(source)},
    )
    written = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                keep = batch.valid
                if keep.any():
                    codes = encode(batch.images[keep]).cpu()
                    for code, label in zip(codes, batch.labels[keep].tolist(), strict=True):
                        writer.write(code, label, key=f"{key_prefix}{written:09d}")
                        written += 1
                if on_batch is not None:
                    on_batch(i + 1, written)
    except BaseException:
        writer.abort()  # nothing half-written stays behind, and no manifest
        raise
    writer.meta["skipped"] = loader.skipped
    return writer.close(), written
