"""Shard builders for the data tests: uneven, corrupt and truncated shard sets made from real images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from jobs.data.manifest import Manifest
from jobs.data.tario import TarShardWriter


def jpeg(color: tuple[int, int, int], size: int = 32) -> bytes:
    """A real JPEG of one colour (easy to recognise after decoding)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def color_of(i: int) -> tuple[int, int, int]:
    """A colour that identifies sample i < 256 after JPEG round trips (16 levels apart per channel)."""
    return 16 * (i % 16) + 8, 16 * (i // 16) + 8, 128


def id_of(rgb_mean: tuple[float, float, float]) -> int:
    """Inverse of color_of, from a decoded image's mean colour in [0, 255]."""
    r, g = (min(15, max(0, round((v - 8) / 16))) for v in rgb_mean[:2])
    return g * 16 + r


def write_shards(dest: str, sizes: list[int], *, storage_options=None, bad: set[int] = frozenset(),
                 name: str = "part", classes: int = 10) -> Manifest:
    """Shards of the given sizes; sample i has colour color_of(i) and class i % classes; `bad` get garbage."""
    w = TarShardWriter(dest, name=name, per_shard=10**9, storage_options=storage_options)
    i = 0
    for size in sizes:
        for _ in range(size):
            data = b"\xff\xd8not really a jpeg" if i in bad else jpeg(color_of(i))
            w.write({"__key__": f"s{i:06d}", "jpg": data, "cls": i % classes})
            i += 1
        w.end_shard()
    return w.close(Manifest(name=name, class_names=[f"c{k}" for k in range(classes)]))


def truncate_file(path: Path, keep: float = 0.5) -> None:
    """Cut a file inside a member's data (not on a 512-byte boundary)."""
    data = path.read_bytes()
    cut = int(len(data) * keep)
    cut -= cut % 512
    path.write_bytes(data[: cut + 100])


def tar_member_names(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()
