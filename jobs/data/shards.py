"""`vqtrain shards make`: an image folder (or a tar of one) -> WebDataset shards + manifest.

Layout in: `ROOT/<class>/.../<image>.{jpg,png,webp}` (a tar may add leading folders, e.g. `train/`).
Layout out: `DEST/<name>-000000.tar …` with samples `{__key__, <ext>: original bytes, cls: int}` and
`DEST/manifest.json`. Image bytes are kept as they are unless `resize` is given. The sample order is a
seeded shuffle by default, so every shard mixes classes and a small shuffle buffer suffices in training.
Torch-free (the CLI imports it).
"""

from __future__ import annotations

import io
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jobs.data import storage
from jobs.data.manifest import Manifest
from jobs.data.tario import TarShardWriter

IMAGE_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class ImageEntry:
    """One source image: path relative to the class root, its class name, and how to read its bytes."""

    relpath: str
    class_name: str
    ext: str
    read: Callable[[], bytes]

    @property
    def key(self) -> str:
        stem = self.relpath.rsplit(".", 1)[0]
        return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


@dataclass
class MakeResult:
    """What `make_shards` wrote and what it had to leave out (and why)."""

    manifest: Manifest
    manifest_url: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0


def _split_classes(paths: list[str], where: str) -> list[tuple[str, str, str]]:
    """(path, class name, path below the class root) for image paths, stripping shared leading folders."""
    parts = [p.strip("/").split("/") for p in paths]
    if not parts:
        raise ValueError(f"{where}: no images (.jpg/.jpeg/.png/.webp) found")
    flat = [p for p in parts if len(p) < 2]
    if flat:
        raise ValueError(f"{where}: image {'/'.join(flat[0])!r} is not inside a class folder (ROOT/<class>/image)")
    strip = 0
    max_strip = min(len(p) for p in parts) - 2  # keep the class folder
    while strip < max_strip and len({p[strip] for p in parts}) == 1:
        strip += 1
    return [(path, p[strip], "/".join(p[strip:])) for path, p in zip(paths, parts, strict=True)]


def _ext(name: str) -> str | None:
    _, dot, ext = name.rpartition(".")
    return IMAGE_EXTS.get(ext.lower()) if dot else None


def scan_source(src: str) -> tuple[list[ImageEntry], int]:
    """Image entries of a folder or a tar of one, and how many non-image files were ignored."""
    if os.path.isdir(src):
        paths, ignored = [], 0
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for fn in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, fn), src).replace(os.sep, "/")
                if _ext(fn) and not fn.startswith("."):
                    paths.append(rel)
                else:
                    ignored += 1
        entries = []
        for rel, cls, below in _split_classes(paths, src):
            full = os.path.join(src, rel)
            entries.append(ImageEntry(below, cls, _ext(rel) or "", lambda full=full: _read_file(full)))
        return entries, ignored
    if os.path.isfile(src) and tarfile.is_tarfile(src):
        return _scan_tar(src)
    raise ValueError(f"source {src!r} is neither an image folder nor a tar file")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _scan_tar(src: str) -> tuple[list[ImageEntry], int]:
    try:
        tf = tarfile.open(src, "r:")  # uncompressed: members can be read back by seeking
        members = tf.getmembers()
        in_memory: dict[str, bytes] | None = None
    except tarfile.ReadError:
        tf = tarfile.open(src, "r:*")  # compressed: one pass into memory, seeking would re-decompress
        members, in_memory = [], {}
        for m in tf:
            if m.isreg() and _ext(m.name):
                members.append(m)
                in_memory[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
    files = [m for m in members if m.isreg()]
    images = [m for m in files if _ext(m.name) and not os.path.basename(m.name).startswith(".")]
    by_name = {m.name: m for m in images}

    def reader(name: str) -> Callable[[], bytes]:
        if in_memory is not None:
            return lambda: in_memory[name]
        return lambda: tf.extractfile(by_name[name]).read()  # type: ignore[union-attr]

    entries = [
        ImageEntry(below, cls, _ext(path) or "", reader(path))
        for path, cls, below in _split_classes([m.name for m in images], src)
    ]
    return entries, len(files) - len(images)


def resize_center_crop(data: bytes, size: int, ext: str) -> bytes:
    """Shorter side to `size`, centre crop to size×size, re-encoded in the same format."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGBA" if ext in ("png", "webp") and im.mode in ("RGBA", "LA", "P") else "RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out = io.BytesIO()
        kwargs = {"quality": 95} if ext in ("jpg", "webp") else {}
        im.save(out, format=_PIL_FORMAT[ext], **kwargs)
        return out.getvalue()


def verify_image(data: bytes) -> None:
    """Cheap structural check (PIL verify); raises on a file PIL cannot parse."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.verify()


def iter_samples(
    entries: list[ImageEntry],
    class_index: dict[str, int],
    *,
    resize: int | None = None,
    verify: bool = True,
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples ready for the tar writer; unreadable images are recorded in `skipped`, not written."""
    for e in entries:
        try:
            data = e.read()
            if resize:
                data = resize_center_crop(data, resize, e.ext)
            elif verify:
                verify_image(data)
        except Exception as exn:  # noqa: BLE001 - any decode failure means: skip and report this file
            if skipped is not None:
                skipped.append((e.relpath, f"{type(exn).__name__}: {exn}"))
            continue
        yield {"__key__": e.key, e.ext: data, "cls": class_index[e.class_name]}


def _existing_shards(dest: str, name: str, storage_options: dict[str, Any] | None) -> list[str]:
    """URLs of `name-NNNNNN.tar` files and the manifest already at `dest`."""
    try:
        found = storage.list_prefix(storage.join_url(dest, f"{name}-"), storage_options)
    except (FileNotFoundError, OSError):
        found = []
    pattern = re.compile(re.escape(name) + r"-\d{6}\.tar$")
    found = [u for u in found if pattern.search(u)]
    manifest = storage.join_url(dest, "manifest.json")
    if storage.exists(manifest, storage_options):
        found.append(manifest)
    return found


def make_shards(
    src: str,
    dest: str,
    *,
    per_shard: int = 1000,
    name: str | None = None,
    resize: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> MakeResult:
    """Write shards of `src` (folder or tar) to `dest` (folder or s3://bucket/prefix) plus manifest.json."""
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive size, got {resize}")
    entries, ignored = scan_source(src)
    keys: dict[str, str] = {}
    for e in entries:
        if e.key in keys:
            raise ValueError(f"{src}: images {keys[e.key]!r} and {e.relpath!r} map to the same key {e.key!r}")
        keys[e.key] = e.relpath
    class_names = sorted({e.class_name for e in entries})
    class_index = {c: i for i, c in enumerate(class_names)}
    entries.sort(key=lambda e: e.key)
    if shuffle:
        random.Random(seed).shuffle(entries)
    if name is None:
        base = os.path.basename(os.path.normpath(src))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", base.split(".")[0]) or "shard"
    existing = _existing_shards(dest, name, storage_options)
    if existing and not overwrite:
        raise ValueError(
            f"{dest} already holds {len(existing)} '{name}' shard file(s) or a manifest; "
            "pass overwrite=True (--overwrite) to replace them"
        )
    skipped: list[tuple[str, str]] = []
    writer = TarShardWriter(dest, name=name, per_shard=per_shard, storage_options=storage_options)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(entries), unit="img", desc=f"shards -> {dest}")
    try:
        for sample in iter_samples(entries, class_index, resize=resize, verify=verify, skipped=skipped):
            writer.write(sample)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.update(len(skipped))
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    manifest = Manifest(
        name=name,
        kind="images",
        class_names=class_names,
        meta={
            "source": os.path.abspath(src),
            "per_shard": per_shard,
            "resize": resize,
            "shuffle_seed": seed if shuffle else None,
            "skipped": [{"file": f, "error": err} for f, err in skipped],
            "ignored_files": ignored,
        },
    )
    manifest = writer.close(manifest)
    written = {storage.join_url(dest, s.url) for s in manifest.shards} | {storage.join_url(dest, "manifest.json")}
    for url in existing:
        if url not in written:  # stale shards of an earlier, larger run
            storage.remove(url, storage_options)
    return MakeResult(manifest, storage.join_url(dest, "manifest.json"), skipped, ignored)
