"""`vqtrain shards check`: read every sample of a shard set and say what is there and what is broken.

Reports samples per shard and per class, samples that fail to decode, shards that cannot be read to the
end, and - when a manifest is known - shards whose count or sha256 differ from it. Torch-free.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from jobs.data import storage
from jobs.data.manifest import ShardSet, resolve_shards, sort_counts
from jobs.data.shards import IMAGE_EXTS
from jobs.data.tario import ShardReadError, read_shard


@dataclass
class ShardReport:
    url: str
    samples: int = 0
    decode_failures: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None  # unreadable shard
    expected_samples: int | None = None
    sha256: str | None = None
    expected_sha256: str | None = None

    @property
    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append(self.error)
        if self.expected_samples is not None and self.samples != self.expected_samples and not self.error:
            out.append(f"{self.samples} samples, manifest says {self.expected_samples}")
        if self.expected_sha256 and self.sha256 and self.sha256 != self.expected_sha256:
            out.append("sha256 differs from manifest")
        return out


@dataclass
class CheckReport:
    shards: list[ShardReport]
    classes: dict[str, int]
    class_names: list[str]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def decode_failures(self) -> int:
        return sum(len(s.decode_failures) for s in self.shards)

    @property
    def unreadable(self) -> list[str]:
        return [s.url for s in self.shards if s.problems]

    @property
    def ok(self) -> bool:
        """False when any shard is unreadable or disagrees with its manifest."""
        return not self.unreadable

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "samples": self.samples,
            "decode_failures": self.decode_failures,
            "unreadable_shards": self.unreadable,
            "classes": self.classes,
            "class_names": self.class_names,
            "shards": [{**asdict(s), "problems": s.problems} for s in self.shards],
        }


class _HashingReader(io.RawIOBase):
    """Pass-through reader that hashes what the tar reader consumes (the whole file, in order)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.f.read(len(b))
        self.sha.update(data)
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        """Hash the rest (padding after the end marker) before closing, so the digest is of the whole file."""
        if self.closed:
            return
        try:
            while chunk := self.f.read(1 << 20):
                self.sha.update(chunk)
        except Exception:  # noqa: BLE001 - a failed drain means no digest, the read error is reported anyway
            self.sha = None  # type: ignore[assignment]
        finally:
            self.f.close()
            super().close()


def _decode_check(sample: dict[str, Any]) -> str | None:
    """None if the sample's payload decodes, else the reason."""
    from PIL import Image

    img_ext = next((e for e in sample if e in IMAGE_EXTS), None)
    try:
        if img_ext is not None:
            with Image.open(io.BytesIO(sample[img_ext])) as im:
                im.convert("RGB").load()
        elif "tokens.npy" in sample or "npy" in sample:
            import numpy as np

            np.load(io.BytesIO(sample.get("tokens.npy", sample.get("npy"))), allow_pickle=False)
        else:
            return f"no image or tokens in sample (has {sorted(k for k in sample if not k.startswith('__'))})"
        if "cls" in sample:
            int(sample["cls"])
    except Exception as exn:  # noqa: BLE001 - any failure is a decode failure to report
        return f"{type(exn).__name__}: {exn}"
    return None


def check_shard(url: str, storage_options: dict[str, Any] | None = None, classes: dict[str, int] | None = None,
                progress=None) -> ShardReport:
    """Read one shard to its end, decoding every sample."""
    rep = ShardReport(url)
    hashing: dict[str, _HashingReader] = {}

    def opener(u: str) -> IO[bytes]:
        r = _HashingReader(storage.open_url(u, "rb", storage_options))
        hashing["r"] = r
        return io.BufferedReader(r, 1 << 20)  # type: ignore[return-value]

    try:
        for sample in read_shard(url, storage_options=storage_options, retries=2, opener=opener):
            rep.samples += 1
            reason = _decode_check(sample)
            if reason:
                rep.decode_failures.append({"key": sample["__key__"], "error": reason})
            elif classes is not None and "cls" in sample:
                c = str(int(sample["cls"]))
                classes[c] = classes.get(c, 0) + 1
            if progress is not None:
                progress.update(1)
        r = hashing.get("r")
        if r is not None and r.sha is not None:
            rep.sha256 = r.sha.hexdigest()
    except ShardReadError as exn:
        rep.error = exn.reason
    return rep


def check_shards(
    sources: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    allowed_roots: Sequence[str] | None = None,
    progress: bool = False,
) -> CheckReport:
    """Check every shard of one or more sources (patterns, prefixes, manifests)."""
    sources = [sources] if isinstance(sources, str) else list(sources)
    sets: list[ShardSet] = []
    for s in sources:
        storage.check_url(s, allowed_roots)  # refused URLs are an error, not an unreadable shard
        try:
            sets.append(resolve_shards(s, storage_options, allowed_roots))
        except (FileNotFoundError, OSError):
            sets.append(ShardSet([s]))  # reported as an unreadable shard below
    classes: dict[str, int] = {}
    class_names: list[str] = []
    total = sum(sum(ss.counts) for ss in sets if ss.counts is not None) or None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="sample", desc="checking")
    reports = []
    try:
        for ss in sets:
            expected = {}
            if ss.manifest is not None:
                class_names = class_names or ss.manifest.class_names
                base = storage.dirname_url(ss.manifest_url or "")
                expected = {storage.join_url(base, s.url): s for s in ss.manifest.shards}
            for i, url in enumerate(ss.urls):
                rep = check_shard(url, storage_options, classes, bar)
                info = expected.get(url)
                if info is not None:
                    rep.expected_samples, rep.expected_sha256 = info.samples, info.sha256 or None
                elif ss.counts is not None:
                    rep.expected_samples = ss.counts[i]
                reports.append(rep)
    finally:
        if bar is not None:
            bar.close()
    classes = sort_counts(classes)
    return CheckReport(reports, classes, class_names)
