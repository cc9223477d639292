"""The streaming tar reader: agrees with tarfile on real-world formats, refuses damaged tars by name."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from jobs.data.tario import ShardReadError, iter_members, read_shard


def _tar(members: dict[str, bytes], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = {
    "short.cls": b"3",
    "x" * 120 + "/long.key.jpg": b"\xff\xd8" + bytes(range(256)) * 5,
    "p" * 90 + "/" + "q" * 90 + ".txt": b"ustar prefix field",
    "ünïcode.cls": b"1",
    "empty.json": b"",
}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_agrees_with_tarfile(fmt) -> None:
    members = dict(MEMBERS)
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the long name or non-ASCII without extensions
        members = {k: v for k, v in members.items() if not k.startswith("x") and k.isascii()}
    raw = _tar(members, fmt)
    assert list(iter_members(io.BytesIO(raw))) == list(members.items())


def test_gzipped_shards_are_read() -> None:
    raw = gzip.compress(_tar({"a.cls": b"1", "b.cls": b"2"}, tarfile.USTAR_FORMAT))
    samples = list(read_shard("x.tar.gz", opener=lambda u: io.BytesIO(raw)))
    assert [(s["__key__"], s["cls"]) for s in samples] == [("a", b"1"), ("b", b"2")]


def test_damaged_tars_raise_naming_the_shard() -> None:
    raw = bytearray(_tar({"a.cls": b"1", "b.jpg": b"z" * 2000}, tarfile.USTAR_FORMAT))
    hdr = 1536  # the dir header, a.cls's header and data come first
    cases = {
        "checksum": bytes(raw[:hdr]) + b"!" + bytes(raw[hdr + 1 :]),  # a changed byte in b.jpg's header
        "inside a header": bytes(raw[: hdr + 100]),
        "unexpected end of data": bytes(raw[: hdr + 512 + 700]),
        "before its end-of-archive marker": bytes(raw[: hdr + 512 + 2048]),
    }
    for reason, data in cases.items():
        with pytest.raises(ShardReadError, match=f"shard s3://b/part-7.tar: .*{reason}") as err:
            list(read_shard("s3://b/part-7.tar", opener=lambda u, d=data: io.BytesIO(d)))
        # a sample is only yielded once the next key starts (or the tar ends cleanly): "a" is held back while
        # the damage could still belong to it, "b" is never yielded from a tar without its end marker
        assert err.value.samples == (1 if reason.startswith("before") else 0)
    with pytest.raises(ShardReadError, match="truncated"):
        list(read_shard("empty.tar", opener=lambda u: io.BytesIO(b"")))


def test_webdataset_written_shards_are_read(tmp_path) -> None:
    import webdataset as wds
    pattern = str(tmp_path / "w-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=3, verbose=0) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "cls": i, "txt": f"sample {i}"})
    got = [s for p in sorted(tmp_path.glob("w-*.tar")) for s in read_shard(str(p))]
    assert [(s["__key__"], int(s["cls"]), s["txt"]) for s in got] == [
        (f"k{i}", i, f"sample {i}".encode()) for i in range(5)]
