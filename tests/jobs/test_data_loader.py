"""The training loader on local shards: equal batches per rank (also under real DDP), exact eval,
determinism, corrupt/truncated data skipped and counted, retries, and no hang when nothing is readable."""

from __future__ import annotations

import io
import multiprocessing as mp
import queue
import time
from pathlib import Path

import pytest
import torch

from jobs.data.loader import ImageDecoder, make_image_loader
from jobs.data.manifest import resolve_shards
from jobs.data.stream import ShardStream
from jobs.data.tario import ShardReadError, read_shard
from tests.jobs.data_helpers import id_of, truncate_file, write_shards


def sample_ids(images: torch.Tensor) -> list[int]:
    """Recover each test sample's index from its colour (see data_helpers.color_of)."""
    means = ((images.mean(dim=(2, 3)) + 1) * 127.5).tolist()
    return [id_of(m) for m in means]


def run_epoch(loader) -> tuple[int, list[int], list[int]]:
    n, ids, labels = 0, [], []
    for batch in loader:
        n += 1
        keep = batch.labels >= 0
        ids += sample_ids(batch.images[keep])
        labels += batch.labels[keep].tolist()
    return n, ids, labels


@pytest.fixture
def uneven(tmp_path) -> Path:
    write_shards(str(tmp_path), [37, 5, 90])
    return tmp_path / "manifest.json"


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_over_uneven_shards_yield_equal_batches(uneven, workers) -> None:
    counts = []
    for rank in (0, 1):
        loader = make_image_loader(str(uneven), image_size=32, batch_size=8, rank=rank, world_size=2,
                                   num_workers=workers, shuffle_buffer=16, timeout=60)
        for _ in range(2):  # two epochs
            n, ids, labels = run_epoch(loader)
            counts.append((n, len(loader)))
            assert all(lab == i % 10 for i, lab in zip(ids, labels, strict=True))  # labels travel with images
    assert counts == [(132 // 16, 132 // 16)] * 4


@pytest.mark.parametrize(("sizes", "world", "batch", "workers"), [
    ([10] * 5, 2, 5, 0),  # 5 shards on 2 ranks: whole shards cannot be split evenly
    ([10] * 5, 2, 5, 2),
    ([37, 5, 90], 2, 8, 2),  # uneven shards
    ([37, 5, 90], 3, 4, 0),
])
def test_a_training_epoch_reads_each_sample_at_most_once(tmp_path, sizes, world, batch, workers) -> None:
    """Ranks × workers take disjoint ranges of the epoch: no sample twice, and all but fewer than
    world·batch samples read (per-shard quotas would duplicate some samples and drop others)."""
    write_shards(str(tmp_path), sizes)
    for epoch in (0, 1):
        ids = []
        for rank in range(world):
            loader = make_image_loader(str(tmp_path), image_size=32, batch_size=batch, rank=rank, world_size=world,
                                       num_workers=workers, shuffle_buffer=16, timeout=60)
            loader.set_epoch(epoch)
            ids += run_epoch(loader)[1]
        total = sum(sizes)
        assert len(ids) == len(set(ids)) == (total // (world * batch)) * world * batch
        assert total - len(ids) < world * batch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_continues_with_the_same_batches(uneven, workers) -> None:
    """Resuming k batches into an epoch (deep ones too: no limit) gives the uninterrupted epoch's remaining
    batches, in order; the skipped part is read but never decoded."""
    from jobs.batches import TrainBatches

    def batches(skip: int | None) -> list[list[int]]:
        loader = make_image_loader(str(uneven), image_size=32, batch_size=4, rank=1, world_size=2,
                                   num_workers=workers, shuffle_buffer=16, timeout=60)
        if skip is None:
            return [sample_ids(b.images) for b in loader]
        it = TrainBatches(loader, start_step=len(loader) + skip)  # epoch 1 in the loader's numbering
        return [sample_ids(next(it).images) for _ in range(len(loader) - skip)] + [sample_ids(next(it).images)]

    full = make_image_loader(str(uneven), image_size=32, batch_size=4, rank=1, world_size=2,
                             num_workers=workers, shuffle_buffer=16, timeout=60)
    full.set_epoch(1)
    epoch1 = [sample_ids(b.images) for b in full]
    epoch2_first = sample_ids(next(iter(full)).images)  # the loader moved on to epoch 2 by itself
    for skip in (0, 3, len(epoch1) - 1):
        got = batches(skip)
        assert got[:-1] == epoch1[skip:], skip
        assert got[-1] == epoch2_first  # and then on into the next epoch


def test_a_deep_resume_seeks_instead_of_replaying(uneven, monkeypatch) -> None:
    """Past RESUME_REPLAY_SAMPLES a worker jumps to its position: the rest of the epoch is new samples, bar at
    most a shuffle buffer's worth that the cut caught in the buffer."""
    from jobs.batches import TrainBatches
    from jobs.data import stream

    monkeypatch.setattr(stream, "RESUME_REPLAY_SAMPLES", 8)  # in-process loader (num_workers=0)

    def loader():
        return make_image_loader(str(uneven), image_size=32, batch_size=4, rank=1, world_size=2,
                                 num_workers=0, shuffle_buffer=16, timeout=60)

    full = loader()
    full.set_epoch(1)
    epoch1 = [sample_ids(b.images) for b in full]
    skip = 10  # 40 samples > 8: seek
    it = TrainBatches(loader(), start_step=len(epoch1) + skip)
    rest = [i for _ in range(len(epoch1) - skip) for i in sample_ids(next(it).images)]
    used = {i for b in epoch1[:skip] for i in b}
    assert len(rest) == len(set(rest)) and set(rest) <= {i for b in epoch1 for i in b}
    assert len(used & set(rest)) <= 16


def test_fewer_shards_than_ranks_and_workers(tmp_path) -> None:
    write_shards(str(tmp_path), [20])
    for rank in range(3):
        loader = make_image_loader(str(tmp_path), image_size=32, batch_size=4, rank=rank, world_size=3,
                                   num_workers=2, epoch_batches=5, timeout=60)
        n, ids, _ = run_epoch(loader)
        assert n == 5 == len(loader) and set(ids) <= set(range(20))


def test_disjoint_shards_per_rank_when_there_are_enough(tmp_path) -> None:
    write_shards(str(tmp_path), [16, 16, 16, 16])
    seen = []
    for rank in (0, 1):
        loader = make_image_loader(str(tmp_path), image_size=32, batch_size=8, rank=rank, world_size=2,
                                   num_workers=0, shuffle_buffer=1)
        n, ids, _ = run_epoch(loader)
        assert n == 4
        seen.append(set(ids))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(64))


def test_seeded_order_is_deterministic(uneven) -> None:
    def order(seed: int, workers: int, epoch: int = 0) -> list[int]:
        loader = make_image_loader(str(uneven), image_size=32, batch_size=8, seed=seed, num_workers=workers,
                                   epoch_batches=6, timeout=60)
        loader.set_epoch(epoch)
        return run_epoch(loader)[1]

    a = order(1, 0)
    assert a == order(1, 0) and a != order(2, 0) and a != order(1, 0, epoch=1)
    assert order(1, 2) == order(1, 2)


def test_images_are_floats_in_range_at_the_job_size(uneven) -> None:
    for size in (16, 48):
        loader = make_image_loader(str(uneven), image_size=size, batch_size=4, num_workers=0, epoch_batches=1)
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, size, size) and images.dtype == torch.float32
        assert labels.dtype == torch.long and images.min() >= -1 and images.max() <= 1
    # 64 of the 132 samples: some have a channel at 8/255 (→ -0.94), some above 128/255
    cifar = make_image_loader(str(uneven), image_size=32, batch_size=64, num_workers=0, epoch_batches=1)
    images, _ = next(iter(cifar))
    assert images.min() < -0.9 and images.max() > 0.0  # mapped to [-1, 1], not [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_reads_every_sample_exactly_once(tmp_path, workers) -> None:
    write_shards(str(tmp_path), [7, 13, 3, 20])  # 43 samples
    batches, ids, positions = [], [], 0
    for rank in range(3):
        loader = make_image_loader(str(tmp_path), image_size=32, batch_size=4, train=False, rank=rank,
                                   world_size=3, num_workers=workers, timeout=60)
        n = 0
        for batch in loader:
            n += 1
            positions += len(batch.labels)
            ids += sample_ids(batch.images[batch.valid])
        batches.append((n, len(loader)))
    assert batches == [(4, 4)] * 3  # ceil(ceil(43/3)/4) on every rank
    assert sorted(ids) == list(range(43)) and positions == 48


def test_corrupt_samples_are_skipped_and_counted(tmp_path) -> None:
    write_shards(str(tmp_path), [10, 10], bad={3, 10})
    train = make_image_loader(str(tmp_path), image_size=32, batch_size=6, num_workers=0, shuffle_buffer=1,
                              epoch_batches=3)
    n, ids, _ = run_epoch(train)
    assert n == 3 and sorted(ids) == sorted(set(range(20)) - {3, 10})
    assert train.skipped == 2 and train.stats["samples"] == 18

    ev = make_image_loader(str(tmp_path), image_size=32, batch_size=6, train=False, num_workers=2, timeout=60)
    batches = list(ev)
    labels = torch.cat([b.labels for b in batches])
    ids = sample_ids(torch.cat([b.images[b.valid] for b in batches]))
    assert sorted(ids) == sorted(set(range(20)) - {3, 10})
    assert len(labels) == 24 and int((labels == -1).sum()) == 2 + 4  # 2 masked bad samples + 4 padding
    assert ev.skipped == 2 and ev.stats["samples"] == 18  # summed over both dataloader workers


def test_truncated_shard_is_a_counted_skip_not_a_hang(tmp_path) -> None:
    write_shards(str(tmp_path), [10, 10, 10])
    truncate_file(tmp_path / "part-000001.tar")
    got_before_cut = sum(1 for _ in _good_prefix(tmp_path / "part-000001.tar"))
    t0 = time.monotonic()
    train = make_image_loader(str(tmp_path), image_size=32, batch_size=5, num_workers=2, epoch_batches=8,
                              timeout=60)
    assert run_epoch(train)[0] == 8
    assert train.stats["bad_shards"] >= 1 and train.skipped >= 10 - got_before_cut

    ev = make_image_loader(str(tmp_path), image_size=32, batch_size=5, train=False, num_workers=0)
    n, ids, _ = run_epoch(ev)
    assert n == 6 and ev.stats["bad_shards"] == 1
    assert ev.skipped == 10 - got_before_cut and len(ids) == 20 + got_before_cut
    assert time.monotonic() - t0 < 60


def _good_prefix(path: Path):
    try:
        yield from read_shard(str(path))
    except ShardReadError:
        return


def test_nothing_readable_is_a_clear_error_not_a_hang(tmp_path) -> None:
    write_shards(str(tmp_path), [4, 4])
    for p in tmp_path.glob("*.tar"):
        p.write_bytes(b"\0" * 100)
    loader = make_image_loader(str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    with pytest.raises(RuntimeError, match="no samples from .* shard reads in a row.*part-00000"):
        next(iter(loader))

    bad = tmp_path / "bad"
    write_shards(str(bad), [5, 5], bad=set(range(10)))
    stream = ShardStream(resolve_shards(str(bad)), ImageDecoder(32), batch_size=2, max_bad_in_a_row=25)
    with pytest.raises(RuntimeError, match="25 undecodable samples in a row"):
        next(iter(stream))


def test_epoch_length_needs_counts_or_an_argument(tmp_path) -> None:
    write_shards(str(tmp_path), [4])
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="epoch_batches is required"):
        make_image_loader(str(tmp_path / "part-000000.tar"), image_size=32, batch_size=2)
    loader = make_image_loader(str(tmp_path / "part-000000.tar"), image_size=32, batch_size=2, epoch_batches=3,
                               num_workers=0)
    assert run_epoch(loader)[0] == 3
    with pytest.raises(ValueError, match="rank 2 must be in"):
        make_image_loader(str(tmp_path / "part-000000.tar"), image_size=32, batch_size=2, rank=2, world_size=2)


class _Flaky(io.RawIOBase):
    """Reads a real file but fails once with a connection reset after `fail_at` bytes."""

    failures = 0

    def __init__(self, path: str, fail_at: int):
        self.f, self.fail_at, self.pos = open(path, "rb"), fail_at, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if _Flaky.failures == 0 and self.pos + len(b) > self.fail_at:
            _Flaky.failures += 1
            raise ConnectionResetError("peer reset")
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def test_transient_read_errors_are_retried_without_duplicates(tmp_path) -> None:
    write_shards(str(tmp_path), [12])
    url = str(tmp_path / "part-000000.tar")
    retries = []
    _Flaky.failures = 0
    samples = list(read_shard(url, opener=lambda u: io.BufferedReader(_Flaky(u, 9000), 1024), backoff=0.01,
                              on_retry=lambda u, e: retries.append(e)))
    assert [s["__key__"] for s in samples] == [f"s{i:06d}" for i in range(12)]
    assert len(retries) == 1 and isinstance(retries[0], ConnectionResetError)

    def always_fails(u):
        raise TimeoutError("slow")

    with pytest.raises(ShardReadError, match=r"part-000000.tar: gave up after 2 retries"):
        list(read_shard(url, opener=always_fails, retries=2, backoff=0.01))
    with pytest.raises(ShardReadError, match="FileNotFoundError"):
        list(read_shard(str(tmp_path / "missing.tar"), retries=5))


def _ddp_worker(rank: int, world: int, port: int, manifest: str, out) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=__import__("datetime").timedelta(seconds=30),
    )
    # rank/world size from torch.distributed (the fallback when a job does not pass them)
    loader = make_image_loader(manifest, image_size=32, batch_size=8, num_workers=1, shuffle_buffer=8, timeout=60)
    n = 0
    for images, _ in loader:
        t = images.mean().reshape(1)
        torch.distributed.all_reduce(t)  # a rank that ran out early would leave the other waiting here
        n += 1
    torch.distributed.barrier()
    out.put((rank, n, len(loader)))
    torch.distributed.destroy_process_group()


def test_real_ddp_ranks_finish_together(uneven) -> None:
    from tests.servers import free_port

    ctx = mp.get_context("fork")  # torch is already imported here; spawn would re-import it
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(uneven), out)) for r in range(2)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + 120
    try:
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not crashed, f"a rank failed (exit codes {crashed}); see its traceback above"
                assert time.monotonic() < deadline, "ranks did not finish within 120 s"
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert sorted(results) == [(0, 8, 8), (1, 8, 8)]
    assert all(p.exitcode == 0 for p in procs)


def test_http_shards_stream(tmp_path) -> None:
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    write_shards(str(tmp_path), [6, 4])
    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        loader = make_image_loader(f"{base}/manifest.json", image_size=32, batch_size=5, train=False,
                                   num_workers=0)
        n, ids, _ = run_epoch(loader)
        assert n == 2 and sorted(ids) == list(range(10))
    finally:
        server.shutdown()
        thread.join()
