"""Shards in a real S3 endpoint (moto's server on 127.0.0.1): make, check and stream them back."""

from __future__ import annotations

import json

import pytest
import s3fs
import torch
from typer.testing import CliRunner

from jobs.data.check import check_shards
from jobs.data.loader import make_image_loader
from jobs.data.manifest import load_manifest, resolve_shards
from jobs.data.shards import make_shards
from service.cli import app
from tests.jobs.data_helpers import write_shards

pytestmark = pytest.mark.integration


@pytest.fixture
def aws_env(monkeypatch, s3_storage_options):
    """The CLI takes endpoint and credentials from the environment, like `aws` does."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_storage_options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_storage_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_storage_options["secret"])


def _fs(opts) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=opts["endpoint_url"], key=opts["key"], secret=opts["secret"],
                             skip_instance_cache=True)


def test_make_check_and_read_back_cifar_slice(cifar_slice, s3_bucket, s3_storage_options, aws_env, tmp_path):
    dest = f"{s3_bucket}/cifar"
    result = CliRunner().invoke(app, ["shards", "make", str(cifar_slice.tar), dest, "--per-shard", "128"])
    assert result.exit_code == 0, result.output
    assert "wrote 3 shards, 300 samples, 10 classes" in result.output
    fs = _fs(s3_storage_options)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(dest)) == [
        "manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    m = load_manifest(f"{dest}/manifest.json", s3_storage_options)
    assert m.num_samples == 300 and m.class_names == list(cifar_slice.classes)

    result = CliRunner().invoke(app, ["shards", "check", f"{dest}/manifest.json", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["samples"] == 300 and report["decode_failures"] == 0
    assert report["classes"] == {str(i): 30 for i in range(10)}
    assert [s["samples"] for s in report["shards"]] == [128, 128, 44]

    # Streamed from S3 = streamed from the same shards made locally: same images, same labels, same order.
    local = make_shards(str(cifar_slice.folder), str(tmp_path / "local"), per_shard=128, progress=False).manifest
    assert [s.sha256 for s in local.shards] == [s.sha256 for s in m.shards]
    remote = make_image_loader(f"{dest}/train-{{000000..000002}}.tar", image_size=32, batch_size=50, train=False,
                               num_workers=2, storage_options=s3_storage_options, timeout=60)
    here = make_image_loader(str(tmp_path / "local"), image_size=32, batch_size=50, train=False, num_workers=2,
                             timeout=60)
    got, want = list(remote), list(here)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    labels = torch.cat([b.labels for b in got])
    assert torch.bincount(labels, minlength=10).tolist() == [30] * 10
    assert remote.skipped == 0 and remote.stats["samples"] == 300


def test_two_ranks_over_uneven_s3_shards_yield_equal_batches(s3_bucket, s3_storage_options):
    dest = f"{s3_bucket}/uneven"
    write_shards(dest, [37, 5, 90], storage_options=s3_storage_options)
    counts = []
    for rank in (0, 1):
        loader = make_image_loader(dest, image_size=32, batch_size=8, rank=rank, world_size=2, num_workers=2,
                                   shuffle_buffer=16, storage_options=s3_storage_options, timeout=60)
        n = sum(1 for _ in loader)
        counts.append((n, len(loader)))
        assert loader.stats["bad_shards"] == 0 and loader.stats["retries"] == 0
    assert counts == [(8, 8), (8, 8)]
    fs = _fs(s3_storage_options)
    fs.rm_file(f"{dest}/manifest.json")
    listed = resolve_shards(f"{dest}/part-", s3_storage_options)  # a key prefix, no manifest
    assert listed.urls == [f"{dest}/part-{i:06d}.tar" for i in range(3)] and listed.counts is None


def test_corrupt_sample_and_truncated_shard_on_s3(s3_bucket, s3_storage_options):
    dest = f"{s3_bucket}/broken"
    write_shards(dest, [10, 10, 10], bad={4}, storage_options=s3_storage_options)
    fs = _fs(s3_storage_options)
    key = f"{dest}/part-000002.tar"
    data = fs.cat_file(key)
    fs.pipe_file(key, data[: len(data) // 2 + 100])  # the upload was cut short

    ev = make_image_loader(dest, image_size=32, batch_size=5, train=False, num_workers=2,
                           storage_options=s3_storage_options, timeout=60)
    labels = torch.cat([b.labels for b in ev])
    assert len(labels) == 30 and ev.stats["bad_shards"] == 1
    valid = int((labels >= 0).sum())
    assert ev.skipped == 30 - valid and 1 + 1 <= ev.skipped <= 1 + 10  # the bad jpg + the lost tail

    train = make_image_loader(dest, image_size=32, batch_size=5, num_workers=2, epoch_batches=6,
                              storage_options=s3_storage_options, timeout=60)
    assert sum(1 for _ in train) == 6
    assert train.stats["bad_shards"] >= 1 and train.skipped >= 1

    rep = check_shards(f"{dest}/manifest.json", s3_storage_options)
    assert not rep.ok and rep.unreadable == [key] and rep.decode_failures == 1
    assert "unreadable tar" in rep.shards[2].error


def test_missing_object_is_named(s3_bucket, s3_storage_options):
    with pytest.raises(FileNotFoundError):
        make_image_loader(f"{s3_bucket}/nothing/manifest.json", image_size=32, batch_size=2,
                          storage_options=s3_storage_options)
    rep = check_shards(f"{s3_bucket}/nothing-000000.tar", s3_storage_options)
    assert not rep.ok and "nothing-000000.tar" in rep.unreadable[0]


def test_pipe_is_refused_by_the_loader(s3_storage_options):
    with pytest.raises(ValueError, match="pipe:"):
        make_image_loader("pipe:aws s3 cp s3://b/x.tar -", image_size=32, batch_size=2, epoch_batches=1,
                          storage_options=s3_storage_options)
