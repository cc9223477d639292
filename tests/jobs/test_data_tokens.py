"""Token shards for stage two: write codes once (locally or to S3), stream them back per rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.data.check import check_shards
from jobs.data.loader import make_image_loader
from jobs.data.manifest import load_manifest
from jobs.data.tokens import TokenShardWriter, encode_images, make_token_loader, token_dtype
from tests.jobs.data_helpers import write_shards


def _grids(n: int, codebook: int) -> np.ndarray:
    return (np.arange(n * 16).reshape(n, 4, 4) * 7919) % codebook


def test_dtype_follows_codebook_size() -> None:
    assert token_dtype(1024) == np.int16 and token_dtype(32768) == np.int16
    assert token_dtype(32769) == np.int32 and token_dtype(2**20) == np.int32


@pytest.mark.parametrize("codebook", [1024, 70000])
def test_write_and_read_back_exactly(tmp_path, codebook) -> None:
    grids = _grids(23, codebook)
    with TokenShardWriter(str(tmp_path), codebook_size=codebook, per_shard=10, tokenizer="models:/t@prod",
                          class_names=["a", "b", "c"]) as w:
        w.write_batch(torch.from_numpy(grids), torch.arange(23) % 3)
    m = load_manifest(str(tmp_path / "manifest.json"))
    assert m.kind == "tokens" and [s.samples for s in m.shards] == [10, 10, 3]
    assert m.meta["grid"] == [4, 4] and m.meta["dtype"] == token_dtype(codebook).name
    assert m.meta["tokenizer"] == "models:/t@prod" and m.class_names == ["a", "b", "c"]
    assert check_shards(str(tmp_path)).ok

    ev = make_token_loader(str(tmp_path), batch_size=4, train=False, num_workers=0)
    batches = list(ev)
    tokens = torch.cat([b.tokens[b.valid] for b in batches])
    labels = torch.cat([b.labels[b.valid] for b in batches])
    assert tokens.dtype == torch.long and tokens.shape == (23, 4, 4)
    assert torch.equal(tokens, torch.from_numpy(grids)) and labels.tolist() == [i % 3 for i in range(23)]

    counts = [sum(1 for _ in make_token_loader(str(tmp_path), batch_size=4, rank=r, world_size=2,
                                               num_workers=0, shuffle_buffer=8)) for r in (0, 1)]
    assert counts == [23 // 8, 23 // 8]


def test_writer_rejects_bad_codes(tmp_path) -> None:
    w = TokenShardWriter(str(tmp_path), codebook_size=16)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        w.write(np.full((2, 2), 16), 0)
    w.write(np.zeros((2, 2), dtype=np.int64), 0)
    with pytest.raises(ValueError, match="differs"):
        w.write(np.zeros((3, 2), dtype=np.int64), 0)
    with pytest.raises(ValueError, match="integers"):
        w.write(np.zeros((2, 2)), 0)


def test_abort_leaves_nothing_behind(tmp_path) -> None:
    """Two finished shards and a half-written one: abort deletes them all and writes no manifest."""
    dest = tmp_path / "tokens"
    w = TokenShardWriter(str(dest), codebook_size=1024, per_shard=10)
    w.write_batch(torch.from_numpy(_grids(25, 1024)), torch.zeros(25, dtype=torch.long))
    assert len(list(dest.glob("*.tar"))) == 2  # finished shards are already in place
    w.abort()
    assert list(dest.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"), TokenShardWriter(str(dest), codebook_size=16, per_shard=2) as w:
        w.write_batch(np.zeros((5, 2, 2), dtype=np.int64), [0] * 5)
        raise RuntimeError("boom")
    assert list(dest.iterdir()) == []


def test_abort_on_s3_deletes_the_uploaded_shards(s3_bucket, s3_storage_options) -> None:
    from jobs.data.storage import filesystem

    dest = f"{s3_bucket}/aborted"
    w = TokenShardWriter(dest, codebook_size=16, per_shard=2, storage_options=s3_storage_options)
    w.write_batch(np.zeros((5, 2, 2), dtype=np.int64), [0] * 5)
    fs, path = filesystem(dest, s3_storage_options)
    assert len(fs.ls(path, refresh=True)) == 2
    w.abort()
    assert not fs.exists(path) or fs.ls(path, refresh=True) == []


def test_encode_images_to_token_shards_on_s3(s3_bucket, s3_storage_options) -> None:
    src, dest = f"{s3_bucket}/images", f"{s3_bucket}/tokens"
    write_shards(src, [9, 6], bad={2}, storage_options=s3_storage_options)

    def encode(images: torch.Tensor) -> torch.Tensor:  # a stand-in tokenizer: 4×4 grid of brightness bins
        pooled = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 8)[:, 0]
        return ((pooled + 1) / 2 * 7.999).long().clamp(0, 7)

    images = make_image_loader(f"{src}/manifest.json", image_size=32, batch_size=4, train=False, rank=0,
                               world_size=1, num_workers=0, storage_options=s3_storage_options)
    m, written = encode_images(encode, images, f"{src}/manifest.json", dest, image_size=32, codebook_size=8,
                               storage_options=s3_storage_options)
    assert written == 14
    assert m.num_samples == 14 and m.meta["skipped"] == 1 and m.meta["grid"] == [4, 4]
    loader = make_token_loader(f"{dest}/manifest.json", batch_size=7, train=False, num_workers=2,
                               storage_options=s3_storage_options, timeout=60)
    labels = torch.cat([b.labels for b in loader])
    assert sorted(labels.tolist()) == sorted(i % 10 for i in range(15) if i != 2)
