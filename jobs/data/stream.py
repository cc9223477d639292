"""Sharded streaming that cannot hang a DDP job: every rank yields exactly the same number of batches.

Training ("train" mode): the samples form an endless sequence (seeded per-cycle shard permutations, one
per epoch). With per-shard counts (a manifest), the R ranks × W dataloader workers take consecutive,
disjoint ranges of it, each exactly its quota of batches: an epoch reads distinct samples, none twice and,
with the default epoch length, all but fewer than R·batch of them (a slot reads into the next slot's range
only to make up for samples it had to skip). Without counts, slots take strided shards of the sequence
instead. Either way each worker yields a fixed quota of batches, so each rank yields exactly
`epoch_batches`.

Evaluation ("eval" mode): every sample of the shard set exactly once, split into contiguous per-rank
ranges; ranks are padded to the same number of batches, padded or undecodable positions get label -1.

Bad samples are skipped (train) or masked (eval) and counted; unreadable shards are counted and named in
a warning; counts travel with each batch (`stats`) so the main process can sum them across workers.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info

from jobs.data.manifest import ShardSet
from jobs.data.tario import ShardReadError, read_shard

log = logging.getLogger(__name__)

STAT_KEYS = ("samples", "skipped", "bad_shards", "retries")
# A resumed epoch replays (reads without decoding) up to this many samples per worker to continue exactly
# where it stopped; deeper in, it seeks to its position (the shuffle buffer's content at the cut is not
# restored: up to a buffer's worth of samples is seen twice or not at all in that epoch).
RESUME_REPLAY_SAMPLES = 50_000


class SampleDecoder(Protocol):
    """Turns a raw sample dict into (tensor, label); raises on a bad sample."""

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> tuple[torch.Tensor, int]: ...

    def placeholder(self) -> torch.Tensor:
        """A tensor of the decoded shape, used for padded eval positions."""
        ...


def _rng(*parts: Any) -> random.Random:
    """A Random seeded by a string of its parts (str seeds hash the same in every process)."""
    return random.Random("-".join(str(p) for p in parts))


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit rank/world size, else torch.distributed's in a job of several ranks, else (0, 1)."""
    from jobs.worker import is_distributed

    if rank is None or world_size is None:
        if is_distributed():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    return rank, world_size


class ShardStream(IterableDataset):
    """Batches of decoded samples from a ShardSet for one rank; see the module docstring for the scheme."""

    def __init__(
        self,
        shards: ShardSet,
        decode: SampleDecoder,
        *,
        batch_size: int,
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epoch_batches: int | None = None,
        storage_options: dict[str, Any] | None = None,
        retries: int = 3,
        max_bad_in_a_row: int = 2000,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not shards.urls:
            raise ValueError("no shards to read")
        self.shards, self.decode, self.batch_size, self.train = shards, decode, batch_size, train
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer = seed, max(1, shuffle_buffer)
        self.storage_options, self.retries = storage_options, retries
        self.max_bad_in_a_row = max_bad_in_a_row
        self.epoch, self.skip_batches = 0, 0
        total = shards.num_samples
        if train:
            if epoch_batches is None:
                if total is None:
                    raise ValueError(
                        "epoch_batches is required when the shards have no manifest with sample counts"
                    )
                epoch_batches = total // (world_size * batch_size)
            if epoch_batches < 1:
                raise ValueError(
                    f"{total} samples give no full batch of {batch_size} per rank on {world_size} ranks; "
                    "lower batch_size or pass epoch_batches"
                )
            self.batches_per_rank = epoch_batches
        else:
            if total is None:
                raise ValueError("eval mode needs per-shard sample counts (a manifest)")
            if total < 1:
                raise ValueError("eval shards hold no samples")
            self.per_rank = math.ceil(total / world_size)
            self.batches_per_rank = math.ceil(self.per_rank / batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (shard order and shuffle depend on it); set before creating workers.

        `skip_batches`: start that many batches into the epoch (a resumed job), which then yields
        `batches_per_rank - skip_batches` batches. Skipped samples are read but not decoded, up to
        RESUME_REPLAY_SAMPLES per worker; beyond that a worker seeks to its position (with a manifest).
        """
        if not 0 <= skip_batches <= self.batches_per_rank:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_rank}], got {skip_batches}")
        self.epoch, self.skip_batches = epoch, skip_batches

    @property
    def epoch_length(self) -> int:
        """Batches this rank yields in the current epoch."""
        return self.batches_per_rank - self.skip_batches

    # -- worker side -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = dict.fromkeys(STAT_KEYS, 0)
        if self.train:
            # The DataLoader takes one batch from each worker in turn, starting with worker 0; batch i of an
            # epoch comes from (logical) worker i % W. A resumed epoch starts at batch `skip_batches`, so
            # physical worker p plays logical worker (p + skip) % W and the order continues unchanged.
            worker = (worker + self.skip_batches) % workers
            quota = self.batches_per_rank // workers + (worker < self.batches_per_rank % workers)
            slot, n_slots = self.rank * workers + worker, self.world_size * workers
            # of the first `skip_batches`, this logical worker had made every W-th
            skip = max(0, (self.skip_batches - worker + workers - 1) // workers)
            skip_samples = skip * self.batch_size
            if self.shards.counts is not None:  # this slot's own range of the epoch's samples
                per = self.batches_per_rank
                before = self.rank * per + worker * (per // workers) + min(worker, per % workers)
                lo = before * self.batch_size
                hi = lo + quota * self.batch_size
                if skip_samples > RESUME_REPLAY_SAMPLES:  # deep resume: seek instead of replaying
                    lo, skip_samples = lo + skip_samples, 0
                items = self._train_items(slot, n_slots, stats, (lo, hi))
            else:
                items = self._train_items(slot, n_slots, stats)
            quota -= skip
            items = self._decoded(_drop(items, skip_samples, stats), stats)
        else:
            b0 = worker * self.batches_per_rank // workers
            b1 = (worker + 1) * self.batches_per_rank // workers
            quota = b1 - b0
            items = self._eval_items(b0 * self.batch_size, b1 * self.batch_size, stats)
        for _ in range(quota):
            xs, ys = [], []
            for x, y in items:
                xs.append(x)
                ys.append(y)
                if len(xs) == self.batch_size:
                    break
            if len(xs) < self.batch_size:  # cannot happen: train streams are endless, eval ranges padded
                raise RuntimeError(f"rank {self.rank} worker {worker}: stream ended early ({len(xs)} samples)")
            delta = dict(stats)
            for k in stats:
                stats[k] = 0
            yield {"x": torch.stack(xs), "y": torch.tensor(ys, dtype=torch.long), "stats": delta}

    def _read(self, index: int, stats: dict[str, int], count_lost: bool = True) -> Iterator[dict[str, Any]]:
        """Samples of shard `index`; an unreadable shard is counted, warned about, and ends early."""
        url = self.shards.urls[index]

        def on_retry(_url: str, _exn: BaseException) -> None:
            stats["retries"] += 1

        got = 0
        try:
            for sample in read_shard(url, storage_options=self.storage_options, retries=self.retries,
                                     on_retry=on_retry):
                got += 1
                yield sample
        except ShardReadError as exn:
            stats["bad_shards"] += 1
            lost = (self.shards.counts[index] - got) if self.shards.counts is not None else 0
            if count_lost:
                stats["skipped"] += max(0, lost)
            log.warning("skipping rest of %s (%d samples lost): %s", url, max(0, lost), exn.reason)
            self.last_error = str(exn)

    def _shard_order(self, slot: int, n_slots: int) -> Iterator[int]:
        """This slot's share of the endless sequence of per-cycle shard permutations."""
        n = len(self.shards.urls)
        g = 0
        for cycle in range(10**12):
            perm = list(range(n))
            _rng("shards", self.seed, self.epoch, cycle).shuffle(perm)
            for idx in perm:
                if g % n_slots == slot:
                    yield idx
                g += 1

    def _train_items(
        self, slot: int, n_slots: int, stats: dict[str, int], span: tuple[int, int] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Raw (still encoded) training samples of one slot in their shuffled order."""
        buffer_rng = _rng("buffer", self.seed, self.epoch, slot)
        if span is None:
            return self._shuffled(self._train_raw(slot, n_slots, stats), buffer_rng)
        # the whole range through the shuffle buffer, then (only if samples were skipped) what follows
        lo, hi = span
        return itertools.chain(self._shuffled(self._positions(lo, hi, stats), buffer_rng),
                               self._positions(hi, None, stats))

    def _decoded(self, raw: Iterator[dict[str, Any]], stats: dict[str, int]) -> Iterator[tuple[torch.Tensor, int]]:
        """Decoded (x, y) items; bad samples skipped and counted, a long run of them is an error."""
        info = get_worker_info()
        logical = (info.id + self.skip_batches) % info.num_workers if info is not None else 0
        aug = _rng("augment", self.seed, self.epoch, self.rank, logical)
        bad_in_a_row = 0
        for sample in raw:
            try:
                item = self.decode(sample, aug)
            except Exception as exn:  # noqa: BLE001 - a bad sample of any kind is skipped and counted
                stats["skipped"] += 1
                bad_in_a_row += 1
                log.debug("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), exn)
                if bad_in_a_row >= self.max_bad_in_a_row:
                    raise RuntimeError(
                        f"{bad_in_a_row} undecodable samples in a row (last: {sample.get('__key__')} in "
                        f"{sample.get('__url__')}: {exn}); are these the right shards?"
                    ) from exn
                continue
            bad_in_a_row = 0
            stats["samples"] += 1
            yield item

    def _train_raw(self, slot: int, n_slots: int, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
        empty_in_a_row = 0
        limit = 2 * len(self.shards.urls) + 2
        for index in self._shard_order(slot, n_slots):
            got = 0
            for sample in self._read(index, stats):
                got += 1
                yield sample
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row >= limit:
                raise RuntimeError(
                    f"no samples from {empty_in_a_row} shard reads in a row; last error: "
                    f"{getattr(self, 'last_error', 'shards are empty')}"
                )

    def _positions(self, lo: int, hi: int | None, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Raw samples at positions [lo, hi) of the epoch's endless sequence (hi None: without end). Samples
        missing from a short or unreadable shard are counted as skipped."""
        counts = self.shards.counts or []
        total = sum(counts)
        if total <= 0:
            raise RuntimeError("the shards hold no samples")
        cycle = lo // total
        g = cycle * total
        empty_in_a_row, limit = 0, 2 * len(counts) + 2
        while hi is None or g < hi:
            perm = list(range(len(counts)))
            _rng("shards", self.seed, self.epoch, cycle).shuffle(perm)
            for index in perm:
                s_lo, g = g, g + counts[index]
                want_lo, want_hi = max(s_lo, lo), g if hi is None else min(g, hi)
                if want_lo >= want_hi:
                    continue
                pos = want_lo
                for i, sample in enumerate(self._read(index, stats, count_lost=False)):
                    if s_lo + i < want_lo:
                        continue
                    if s_lo + i >= want_hi:
                        break
                    pos = s_lo + i + 1
                    yield sample
                stats["skipped"] += want_hi - pos
                empty_in_a_row = 0 if pos > want_lo else empty_in_a_row + 1
                if empty_in_a_row >= limit:
                    raise RuntimeError(
                        f"no samples from {empty_in_a_row} shard reads in a row; last error: "
                        f"{getattr(self, 'last_error', 'shards are empty')}"
                    )
            cycle += 1

    def _shuffled(self, src: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Shuffle buffer over raw (still encoded, so small) samples, as webdataset's: it starts yielding
        after `min(100, size)` samples and grows to `size` by reading two samples per one yielded."""
        buf: list[dict[str, Any]] = []
        initial = min(100, self.shuffle_buffer)
        src = iter(src)
        for sample in src:
            buf.append(sample)
            if len(buf) < self.shuffle_buffer:
                nxt = next(src, None)
                if nxt is not None:
                    buf.append(nxt)
            if len(buf) >= initial:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _eval_items(self, lo: int, hi: int, stats: dict[str, int]) -> Iterator[tuple[torch.Tensor, int]]:
        """Positions [lo, hi) of this rank's range, in order; padding and bad samples come out as label -1."""
        counts = self.shards.counts or []
        start = self.rank * self.per_rank
        end = min(sum(counts), start + self.per_rank)
        g_lo, g_hi = min(end, start + lo), min(end, start + hi)
        aug = random.Random(0)
        offset = 0
        for index, count in enumerate(counts):
            s_lo, s_hi = offset, offset + count
            offset = s_hi
            want_lo, want_hi = max(s_lo, g_lo), min(s_hi, g_hi)
            if want_lo >= want_hi:
                continue
            pos = want_lo
            for i, sample in enumerate(self._read(index, stats, count_lost=False)):
                g = s_lo + i
                if g < want_lo:
                    continue
                if g >= want_hi:
                    break
                try:
                    x, y = self.decode(sample, aug)
                    stats["samples"] += 1
                except Exception as exn:  # noqa: BLE001 - masked and counted, the count stays exact
                    stats["skipped"] += 1
                    log.debug("eval: bad sample %s: %s", sample.get("__key__"), exn)
                    x, y = self.decode.placeholder(), -1
                pos = g + 1
                yield x, y
            for _ in range(pos, want_hi):  # the shard ended early: its missing samples are masked
                stats["skipped"] += 1
                yield self.decode.placeholder(), -1
        for _ in range((hi - lo) - (g_hi - g_lo)):  # padding beyond this rank's real samples
            yield self.decode.placeholder(), -1


def _drop(items: Iterator[dict[str, Any]], n: int, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    """`items` without its first n (a resumed epoch's used part: read, not decoded). What reading them ran
    into was counted before the checkpoint, so it is not counted again."""
    items = iter(items)
    if n:
        saved = dict(stats)
        for _ in itertools.islice(items, n):
            pass
        stats.update(saved)
    yield from items
