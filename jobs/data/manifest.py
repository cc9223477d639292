"""`manifest.json` beside a set of shards, and resolving a user's shard source to a concrete list.

The manifest is what makes an epoch length and an exact eval count possible without reading the data
first: it records each shard's sample count and sha256, the class names, and how the shards were made.
Torch-free (used by the CLI).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.data import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "vqtrain-shards/1"


def sort_counts(counts: dict[str, int]) -> dict[str, int]:
    """Class counts ordered by class id (numerically, so "10" follows "9")."""

    def key(kv: tuple[str, int]) -> tuple[int, int, str]:
        k = kv[0]
        return (0, int(k), "") if k.lstrip("-").isdigit() else (1, 0, k)

    return dict(sorted(counts.items(), key=key))


@dataclass
class ShardInfo:
    """One shard: `url` relative to the manifest's folder (or absolute)."""

    url: str
    samples: int
    sha256: str = ""
    bytes: int = 0
    classes: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    """Everything a loader needs to know about a shard set before reading it."""

    name: str
    kind: str = "images"  # "images" | "tokens"
    shards: list[ShardInfo] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def class_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for k, v in s.classes.items():
                out[k] = out.get(k, 0) + v
        return sort_counts(out)

    def to_json(self) -> str:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        d["num_shards"] = len(self.shards)
        d["class_counts"] = self.class_counts
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
            shards = [ShardInfo(**s) for s in d["shards"]]
            return cls(
                name=d.get("name", ""),
                kind=d.get("kind", "images"),
                shards=shards,
                class_names=list(d.get("class_names", [])),
                meta=dict(d.get("meta", {})),
                format=d.get("format", FORMAT),
                created=d.get("created", ""),
            )
        except (ValueError, KeyError, TypeError) as exn:
            raise ValueError(f"{where}: not a valid shard manifest ({exn})") from exn


def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read a manifest; raises FileNotFoundError/ValueError naming the URL."""
    return Manifest.from_json(storage.read_bytes(url, storage_options), where=url)


def write_manifest(manifest: Manifest, dest: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write `dest/manifest.json`; returns its URL."""
    url = storage.join_url(dest, MANIFEST_NAME)
    storage.write_bytes(url, manifest.to_json().encode(), storage_options)
    return url


@dataclass
class ShardSet:
    """A resolved shard source: absolute URLs, and per-shard counts when a manifest knows them."""

    urls: list[str]
    counts: list[int] | None = None
    manifest: Manifest | None = None
    manifest_url: str | None = None

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def _from_manifest(url: str, storage_options: dict[str, Any] | None, allowed_roots) -> ShardSet:
    m = load_manifest(url, storage_options)
    base = storage.dirname_url(url)
    urls = storage.check_all((storage.join_url(base, s.url) for s in m.shards), allowed_roots)
    if not urls:
        raise ValueError(f"{url}: manifest lists no shards")
    return ShardSet(urls, [s.samples for s in m.shards], m, url)


def _norm(url: str) -> str:
    return url if storage.is_remote(url) else os.path.abspath(storage.local_path(url))


def _attach_sibling_manifest(ss: ShardSet, storage_options, allowed_roots) -> ShardSet:
    """Counts for a pattern/prefix from the manifest in the shards' folder, if it lists them all."""
    folders = {storage.dirname_url(u) for u in ss.urls}
    if len(folders) != 1:
        return ss
    murl = storage.join_url(folders.pop(), MANIFEST_NAME)
    try:
        if not storage.exists(murl, storage_options):
            return ss
        full = _from_manifest(murl, storage_options, allowed_roots)
    except (OSError, ValueError):
        return ss
    by_url = {_norm(u): c for u, c in zip(full.urls, full.counts or [], strict=True)}
    if all(_norm(u) in by_url for u in ss.urls):
        return ShardSet(ss.urls, [by_url[_norm(u)] for u in ss.urls], full.manifest, murl)
    return ss


def resolve_shards(
    source: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
) -> ShardSet:
    """Turn a brace pattern, a list, a prefix/folder or a manifest URL into a checked ShardSet.

    Sample counts come from the manifest when the source is one, or when a `manifest.json` beside
    the shards lists every one of them; otherwise `counts` is None and callers must be told the epoch length.
    """
    if isinstance(source, str):
        sources = [source]
    else:
        sources = list(source)
    if not sources:
        raise ValueError("no shard source given")
    for s in sources:
        storage.check_url(s, allowed_roots)
    if len(sources) == 1 and sources[0].endswith(".json"):
        return _from_manifest(sources[0], storage_options, allowed_roots)
    urls: list[str] = []
    for s in sources:
        if s.endswith(".json"):
            raise ValueError(f"{s}: give a manifest on its own, not mixed with other shard sources")
        if storage.looks_like_pattern(s):
            urls.extend(storage.expand_pattern(s))
        else:
            murl = storage.join_url(s, MANIFEST_NAME)
            if len(sources) == 1 and storage.exists(murl, storage_options):
                return _from_manifest(murl, storage_options, allowed_roots)
            found = storage.list_prefix(s, storage_options)
            if not found:
                raise FileNotFoundError(f"no shard files (*.tar) found under {s!r}")
            urls.extend(found)
    urls = storage.check_all(urls, allowed_roots)
    return _attach_sibling_manifest(ShardSet(urls), storage_options, allowed_roots)
