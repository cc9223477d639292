"""`vqtrain shards make|check` on local folders: counts, labels, keys, manifest, corrupt input, exit codes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from typer.testing import CliRunner

from jobs.data.check import check_shards
from jobs.data.manifest import load_manifest
from jobs.data.shards import make_shards
from service.cli import app
from tests.jobs.data_helpers import tar_member_names, truncate_file, write_shards

runner = CliRunner()


def _samples(path: Path) -> list[tuple[str, int, bytes]]:
    out, cur = [], {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            cur.setdefault(key, {})[ext] = tf.extractfile(m).read()
    for key, d in cur.items():
        out.append((key, int(d["cls"]), d["jpg"]))
    return out


def test_make_from_folder_keeps_bytes_labels_and_counts(cifar_slice, tmp_path) -> None:
    dest = tmp_path / "shards"
    res = make_shards(str(cifar_slice.folder), str(dest), per_shard=128, progress=False)
    m = res.manifest
    assert [s.samples for s in m.shards] == [128, 128, 44]
    assert m.num_samples == cifar_slice.count == 300
    assert m.class_names == list(cifar_slice.classes)
    assert m.class_counts == {str(i): 30 for i in range(10)}
    for info in m.shards:  # manifest sha256 and size are of the file as stored
        data = (dest / info.url).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.bytes
    seen = {}
    for info in m.shards:
        for key, cls, jpg in _samples(dest / info.url):
            name = m.class_names[cls]
            assert key.startswith(name + "_")
            original = cifar_slice.folder / name / (key[len(name) + 1 :] + ".jpg")
            assert jpg == original.read_bytes()  # bytes kept as they are
            seen[key] = cls
    assert len(seen) == 300
    # shards mix classes (seeded shuffle), so a small shuffle buffer suffices in training
    assert len(m.shards[0].classes) == 10


def test_make_from_tar_equals_make_from_folder(cifar_slice, tmp_path) -> None:
    a = make_shards(str(cifar_slice.folder), str(tmp_path / "a"), per_shard=100, progress=False).manifest
    b = make_shards(str(cifar_slice.tar), str(tmp_path / "b"), per_shard=100, progress=False).manifest
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # stable keys, order, bytes
    assert a.name == "train" and b.name == "train"
    assert tar_member_names(tmp_path / "a" / "train-000000.tar")[:2] == \
        tar_member_names(tmp_path / "b" / "train-000000.tar")[:2]


def test_make_with_resize_crops_to_square(cifar_slice, tmp_path) -> None:
    from PIL import Image

    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    Image.new("RGB", (80, 40), (200, 10, 10)).save(src / "cats" / "wide.png")
    Image.new("RGB", (30, 60), (10, 200, 10)).save(src / "cats" / "tall.webp")
    res = make_shards(str(src), str(tmp_path / "out"), resize=16, progress=False)
    samples = {}
    with tarfile.open(tmp_path / "out" / "src-000000.tar") as tf:
        for m in tf:
            samples[m.name] = tf.extractfile(m).read()
    assert set(samples) == {"cats_wide.png", "cats_wide.cls", "cats_tall.webp", "cats_tall.cls"}
    import io

    for name in ("cats_wide.png", "cats_tall.webp"):
        with Image.open(io.BytesIO(samples[name])) as im:
            assert im.size == (16, 16)
    assert res.manifest.meta["resize"] == 16


def test_corrupt_source_image_is_skipped_and_reported(cifar_slice, tmp_path) -> None:
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            (src / cls / f"{i}.jpg").write_bytes((cifar_slice.folder / "cat" / f"{i:04d}.jpg").read_bytes())
    (src / "b" / "9.jpg").write_bytes(b"not an image")
    (src / "b" / "notes.txt").write_text("ignored")
    result = runner.invoke(app, ["shards", "make", str(src), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 shards, 6 samples, 2 classes" in result.output
    assert "skipped unreadable image b/9.jpg" in result.output
    m = load_manifest(str(tmp_path / "out" / "manifest.json"))
    assert m.meta["skipped"][0]["file"] == "b/9.jpg" and m.meta["ignored_files"] == 1


def test_images_outside_class_folders_are_an_error(tmp_path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    result = runner.invoke(app, ["shards", "make", str(tmp_path / "flat"), str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 2 and "not inside a class folder" in result.output


def test_check_agrees_and_flags_broken_shards(tmp_path) -> None:
    write_shards(str(tmp_path), [6, 5, 4], bad={7})
    rep = check_shards(str(tmp_path / "manifest.json"))
    assert rep.ok and rep.samples == 15 and rep.decode_failures == 1
    assert [s.samples for s in rep.shards] == [6, 5, 4]
    assert rep.shards[1].decode_failures[0]["key"] == "s000007"
    assert sum(rep.classes.values()) == 14  # the undecodable sample is not counted in a class

    result = runner.invoke(app, ["shards", "check", str(tmp_path / "part-{000000..000002}.tar"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["samples"] == 15 and report["decode_failures"] == 1 and report["unreadable_shards"] == []

    truncate_file(tmp_path / "part-000001.tar")
    result = runner.invoke(app, ["shards", "check", str(tmp_path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["unreadable_shards"] == [str(tmp_path / "part-000001.tar")]
    assert "unreadable tar" in report["shards"][1]["problems"][0]

    result = runner.invoke(app, ["shards", "check", str(tmp_path / "missing-000000.tar"), "--no-progress"])
    assert result.exit_code == 1 and "unreadable shard" in result.output


def test_check_notices_a_shard_cut_at_a_member_boundary(tmp_path) -> None:
    write_shards(str(tmp_path), [4])
    path = tmp_path / "part-000000.tar"
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        third = tf.getmembers()[2]
    path.write_bytes(data[: third.offset])  # a clean cut before the 3rd member: tarfile alone would not notice
    rep = check_shards(str(tmp_path / "manifest.json"))
    assert not rep.ok and "truncated" in rep.shards[0].error


def test_check_notices_a_changed_shard(tmp_path) -> None:
    write_shards(str(tmp_path), [3])
    path = tmp_path / "part-000000.tar"
    data = bytearray(path.read_bytes())
    data[-1] = 1  # inside the zero padding: still a readable tar, but not the one in the manifest
    path.write_bytes(bytes(data))
    rep = check_shards(str(tmp_path / "manifest.json"))
    assert rep.shards[0].problems == ["sha256 differs from manifest"] and not rep.ok


def test_cli_stays_torch_free() -> None:
    code = "import sys, service.cli, jobs.data.shards, jobs.data.check; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_written_shards_are_readable_by_webdataset(tmp_path) -> None:
    import webdataset as wds
    write_shards(str(tmp_path), [3, 2])
    ds = wds.WebDataset(str(tmp_path / "part-{000000..000001}.tar"), shardshuffle=False).to_tuple("__key__", "cls")
    assert [(k, int(c)) for k, c in ds] == [(f"s{i:06d}", i % 10) for i in range(5)]


def test_remaking_into_a_used_destination_needs_overwrite(cifar_slice, tmp_path) -> None:
    dest = tmp_path / "out"
    make_shards(str(cifar_slice.folder), str(dest), per_shard=100, progress=False)
    result = runner.invoke(app, ["shards", "make", str(cifar_slice.folder), str(dest), "--no-progress"])
    assert result.exit_code == 2 and "already holds 4 'train' shard file(s)" in result.output
    result = runner.invoke(app, ["shards", "make", str(cifar_slice.folder), str(dest), "--per-shard", "200",
                                 "--overwrite", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar"]
