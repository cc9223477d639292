"""The jobs' helpers that need no Ray cluster: loaders under the allowed roots."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.checkpoints import CheckpointClock
from jobs.progress import Progress
from jobs.worker import Worker


def _cpu_worker() -> Worker:
    return Worker(0, 1, 0, torch.device("cpu"))


def test_loaders_keep_local_data_under_the_allowed_roots(tmp_path, monkeypatch) -> None:
    """Under the service (`VQTRAIN_ALLOWED_ROOTS` set) every loader a job builds refuses local shards
    outside the roots: images (both stages), token shards (maskgit) and the tokenize job's input."""
    from types import SimpleNamespace

    from jobs.batches import image_loader
    from jobs.data.tokens import TokenShardWriter
    from jobs.job import JobEnv
    from jobs.spec import parse_spec
    from jobs.tokenize import encode_split
    from jobs.train_maskgit import token_loader
    from tests.jobs.data_helpers import write_shards
    from vqbase.protocol import ALLOWED_ROOTS_ENV

    images, tokens = tmp_path / "images", tmp_path / "tokens"
    write_shards(str(images), [4])
    with TokenShardWriter(str(tokens), codebook_size=16) as w:
        w.write_batch(torch.zeros(4, 4, 4, dtype=torch.long), [0, 1, 2, 3])
    data = {"num_workers": 0, "image_size": 16}
    optim = {"batch_size": 2}
    tok_spec = parse_spec({"name": "t", "data": {"train": str(images), **data}, "optim": optim})
    mg_spec = parse_spec({"kind": "maskgit", "name": "m", "tokenizer": "/tok", "optim": optim,
                          "data": {"train": str(tokens), **data}})
    tz_spec = parse_spec({"kind": "tokenize", "name": "z", "tokenizer": "/tok", "output": str(tmp_path / "out"),
                          "optim": optim, "data": {"train": str(images), **data}})
    tok = SimpleNamespace(config=SimpleNamespace(downsample=4, codebook_size=16))
    worker = _cpu_worker()
    env = JobEnv(tz_spec, worker, None, Progress(None, 1, worker), {}, "z", CheckpointClock(10, None, 1, worker.device))

    monkeypatch.setenv(ALLOWED_ROOTS_ENV, json.dumps([str(tmp_path / "elsewhere")]))
    for build in (
        lambda: image_loader(tok_spec, worker, train=True),
        lambda: token_loader(mg_spec, worker, train=True, tok=tok),
        lambda: encode_split(env, tok, str(images), str(tmp_path / "out" / "train"), "train"),
    ):
        with pytest.raises(ValueError, match="outside the allowed data roots"):
            build()
    assert not (tmp_path / "out").exists()

    monkeypatch.setenv(ALLOWED_ROOTS_ENV, json.dumps([str(tmp_path)]))
    assert len(image_loader(tok_spec, worker, train=True)) >= 1
    assert len(token_loader(mg_spec, worker, train=True, tok=tok)) >= 1


def test_workers_get_the_drivers_allowed_roots(monkeypatch) -> None:
    """The roots travel in the loop config too: workers of a cluster joined by hand lack the driver's env."""
    from jobs.job import loop_config, open_job
    from jobs.spec import parse_spec
    from vqbase.protocol import ALLOWED_ROOTS_ENV, allowed_roots_from_env

    spec = parse_spec({"name": "t", "data": {"train": "/data/train"}})
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, json.dumps(["/data"]))
    config = loop_config(spec, run_id="", tracking_uri="", job_id="j", sink=None)
    assert config["allowed_roots"] == ["/data"]
    monkeypatch.delenv(ALLOWED_ROOTS_ENV)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # open_job sizes torch for a worker
    open_job(config)
    assert allowed_roots_from_env() == ["/data"]


def test_s3_checkpoint_storage_takes_the_same_options_as_shard_reading(s3_server, s3_bucket) -> None:
    """AWS-style key names and the per-scheme form (`{"s3": {...}}`) reach the checkpoint filesystem, as they
    reach the shard reader: checkpoints land on the configured endpoint, not on some default store."""
    import pyarrow.fs

    from jobs.checkpoints import checkpoint_storage
    from tests import servers

    flat = {"endpoint_url": s3_server, "aws_access_key_id": servers.S3_KEY, "aws_secret_access_key": servers.S3_SECRET}
    for options in (flat, {"s3": flat}):
        path, fs = checkpoint_storage(f"{s3_bucket}/ckpt", options)
        assert path == f"{s3_bucket.removeprefix('s3://')}/ckpt"
        with fs.open_output_stream(f"{path}/probe.txt") as f:
            f.write(b"ok")
        assert fs.get_file_info(f"{path}/probe.txt").type == pyarrow.fs.FileType.File
    path, fs = checkpoint_storage(f"s3a://{s3_bucket.removeprefix('s3://')}/ckpt", flat)
    assert fs.get_file_info(f"{path}/probe.txt").type == pyarrow.fs.FileType.File


def test_token_shards_of_another_tokenizer_version_are_refused(tmp_path) -> None:
    """Codes from tokenizer v1 mean nothing to v2, even with the same codebook size and grid."""
    from types import SimpleNamespace

    from jobs.data.tokens import TokenShardWriter
    from jobs.spec import SpecError, parse_spec
    from jobs.train_maskgit import token_loader

    tokens = tmp_path / "tokens"
    with TokenShardWriter(str(tokens), codebook_size=16, tokenizer="models:/tok/1") as w:
        w.write_batch(torch.zeros(4, 4, 4, dtype=torch.long), [0, 1, 2, 3])
    tok = SimpleNamespace(config=SimpleNamespace(downsample=4, codebook_size=16))

    def spec(tokenizer: str):
        return parse_spec({"kind": "maskgit", "name": "m", "tokenizer": tokenizer, "optim": {"batch_size": 2},
                           "data": {"train": str(tokens), "num_workers": 0, "image_size": 16}})

    with pytest.raises(SpecError, match="models:/tok/1.*models:/tok/2"):
        token_loader(spec("models:/tok/2"), _cpu_worker(), train=True, tok=tok)
    assert len(token_loader(spec("models:/tok/1"), _cpu_worker(), train=True, tok=tok)) >= 1
    assert len(token_loader(spec("/local/tok"), _cpu_worker(), train=True, tok=tok)) >= 1  # not comparable


class _CountingLoader:
    """A loader that has skipped `skipped` samples so far (what `ShardLoader.skipped` reports)."""

    def __init__(self, skipped: int) -> None:
        self.skipped = skipped

    def __len__(self) -> int:
        return 4

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        pass

    def __iter__(self):
        return iter(range(4))


def _skip_counting_rank(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from jobs.batches import TrainBatches

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loader = _CountingLoader(skipped=3 if rank == 0 else 5)
    batches = TrainBatches(loader, start_step=0, skipped_before=100)  # resumed: 100 skipped before
    seen = []
    for step in range(1, 8):
        loader.skipped += rank  # rank 1 keeps finding bad samples
        batches.sync_skipped(step, torch.device("cpu"), at_checkpoint=step == 7)
        seen.append(batches.skipped)
    torch.save(seen, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _run_two_ranks(target, tmp_path) -> None:
    """`target(rank, port, out_dir)` in two spawned processes that form a gloo group; both must succeed."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [mp.get_context("spawn").Process(target=target, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_skipped_samples_are_summed_over_ranks_and_survive_a_resume(tmp_path) -> None:
    _run_two_ranks(_skip_counting_rank, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # SKIP_SYNC_EVERY (50) is beyond step 7: only the checkpoint at step 7 sums; before it, the resumed base
    assert r0 == r1 == [100] * 6 + [100 + 3 + (5 + 7)]


def test_checkpoint_clock_by_steps_minutes_and_the_last_step(monkeypatch) -> None:
    """Checkpoints every `every` steps, at the last step, and once `every_minutes` have passed since the last
    one: the time rule is looked at only every TIME_CHECK_EVERY steps (ranks agree there) and restarts at
    each checkpoint."""
    import jobs.checkpoints as common

    now = [1000.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: now[0])
    clock = CheckpointClock(every=100, every_minutes=2, steps=250, device=torch.device("cpu"))
    assert [s for s in range(1, 251) if clock.due(s)] == [100, 200, 250]  # no time passed

    now[0] += 121  # past two minutes: the next multiple of TIME_CHECK_EVERY checkpoints
    assert not clock.due(7) and clock.due(common.TIME_CHECK_EVERY * 3)
    assert clock.due(common.TIME_CHECK_EVERY * 3)  # asked twice in one step (skipped sync, then the save)
    clock.saved()
    assert not clock.due(common.TIME_CHECK_EVERY * 4)  # the window restarts at each checkpoint
    now[0] += 119
    assert not clock.due(common.TIME_CHECK_EVERY * 5)
    now[0] += 2
    assert clock.due(common.TIME_CHECK_EVERY * 6)

    steps_only = CheckpointClock(every=100, every_minutes=None, steps=250, device=torch.device("cpu"))
    now[0] += 10**6
    assert [s for s in range(1, 251) if steps_only.due(s)] == [100, 200, 250]


def test_checkpoint_every_minutes_is_on_by_default() -> None:
    from jobs.spec import SpecError, parse_spec

    spec = parse_spec({"name": "t", "data": {"train": "/x"}})
    assert spec.checkpoint.every_minutes == 5
    assert parse_spec({"name": "t", "data": {"train": "/x"}, "checkpoint": {"every_minutes": None}}).checkpoint.every_minutes is None
    with pytest.raises(SpecError, match="checkpoint.every_minutes"):
        parse_spec({"name": "t", "data": {"train": "/x"}, "checkpoint": {"every_minutes": 0}})


def _clock_rank(rank: int, port: int, out: str) -> None:
    """Rank 1's clock has run past the window, rank 0's has not: both must checkpoint at the same step."""
    import torch.distributed as dist

    import jobs.checkpoints as common

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    clock = CheckpointClock(every=1000, every_minutes=1, steps=1000, device=torch.device("cpu"))
    clock.since -= 61 * rank  # as if rank 1 had started a minute earlier
    due = [s for s in range(1, 3 * common.TIME_CHECK_EVERY + 1) if clock.due(s)]
    torch.save(due, f"{out}/clock{rank}.pt")
    dist.destroy_process_group()


def test_ranks_agree_on_a_wall_clock_checkpoint(tmp_path) -> None:
    """`ray.train.report` is a barrier: a rank checkpointing alone would hang the job. The time rule is one
    MAX all-reduce, so the rank whose clock is late decides for all."""
    import jobs.checkpoints as common

    _run_two_ranks(_clock_rank, tmp_path)
    due = [torch.load(tmp_path / f"clock{r}.pt") for r in range(2)]
    # every TIME_CHECK_EVERY steps, since nothing resets the window here
    assert due[0] == due[1] == [common.TIME_CHECK_EVERY * k for k in (1, 2, 3)]
