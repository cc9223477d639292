"""The `data:` section: where the WebDataset shards are (local paths or s3://, gs://, http(s):// URLs, brace
patterns, prefixes, manifests) and how to stream them."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from jobs.spec.fields import StrictModel, check_urls


class DataSpec(StrictModel):
    """Where the WebDataset shards are and how to stream them."""

    train: str | list[str] | None = Field(
        None, description="brace pattern, prefix/dir, manifest.json URL, or a list of them (required but for kind=eval)"
    )
    eval: str | list[str] | None = Field(None, description="same forms as train; optional")
    image_size: int = Field(32, ge=8, le=4096)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec/s3fs")
    shuffle_buffer: int = Field(1000, ge=0, le=10**7)
    num_workers: int = Field(1, ge=0, le=64, description="dataloader workers per training worker")
    epoch_batches: int | None = Field(
        None, ge=1, le=10**9, description="batches per rank per epoch; null = from manifest"
    )

    _urls = field_validator("train", "eval")(check_urls)
