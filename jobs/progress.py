"""Progress and per-step logging of the training jobs: rank 0's progress records (printed by the driver
as `VQTRAIN_PROGRESS {...}` lines, which the service and CLI parse), throughput and codebook-sync time, and
the metrics every loop logs each step.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TextIO

import ray
import torch

from jobs.tracking import to_floats
from vqbase.protocol import progress_line

if TYPE_CHECKING:
    from jobs.batches import TrainBatches
    from jobs.worker import Worker


@ray.remote(num_cpus=0)
class ProgressSink:
    """Collects rank 0's progress records so that the driver prints them on its own stdout."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def push(self, item: dict) -> None:
        self.items.append(item)

    def drain(self) -> list[dict]:
        items, self.items = self.items, []
        return items


class ProgressPrinter:
    """Driver side: a thread that drains the sink and prints one `VQTRAIN_PROGRESS {...}` line per record."""

    def __init__(self, sink: Any, out: TextIO | None = None, interval: float = 0.5):
        self.sink, self.out, self.interval = sink, out, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vqtrain-progress", daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._flush()

    def _flush(self) -> None:
        try:
            items = ray.get(self.sink.drain.remote(), timeout=10)
        except Exception:  # the sink is best effort: progress must never fail the job
            return
        out = self.out or sys.stdout
        for item in items:
            out.write(progress_line(item) + "\n")
        out.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._flush()


class Progress:
    """Rank 0 side: throttled progress records (every `interval` s and at the last step): step, total,
    metrics, images/s and the record's `time` (unix seconds).

    The records go to the job's log, which the service re-reads to show progress; so that a long job's log
    stays small, the interval grows with the job's age (1/60 of it) up to `max_interval`.
    """

    def __init__(self, sink: Any, total: int, worker: Worker, interval: float = 0.5, max_interval: float = 10.0):
        self.sink, self.total, self.worker, self.interval = sink, total, worker, interval
        self.max_interval = max(interval, max_interval)
        self._last = 0.0
        self._start = time.monotonic()

    def update(self, step: int, metrics: dict[str, Any], images_per_s: float | None, force: bool = False) -> None:
        if not self.worker.is_main:
            return
        now = time.monotonic()
        wait = min(self.max_interval, max(self.interval, (now - self._start) / 60)) if self.interval else 0.0
        if not force and step < self.total and now - self._last < wait:
            return
        self._last = now
        present = {k: v for k, v in metrics.items() if isinstance(v, int | float) or hasattr(v, "detach")}
        values = dict(zip(present, to_floats(list(present.values())), strict=True))  # one read-back
        item = {
            "step": int(step),
            "total": int(self.total),
            "time": round(time.time(), 3),  # unix seconds on rank 0: the service's ETA uses the step rate
            "metrics": {k: round(v, 6) for k, v in values.items() if math.isfinite(v)},
            "images_per_s": None if images_per_s is None else round(float(images_per_s), 2),
        }
        if self.sink is None:
            print(progress_line(item), flush=True)
        else:
            self.sink.push.remote(item)


class SyncClock:
    """Seconds this process spent inside the quantizer's own collectives (`vqmodels.quantize.dist`), i.e.
    keeping the codebook in sync across ranks, as the quantizer's timing hook reports it. With gloo the collectives are
    synchronous, so this is their full cost (waiting for the slowest rank included); with NCCL it is
    the launch cost plus whatever the quantizer waits for."""

    seconds = 0.0

    @classmethod
    def install(cls) -> type[SyncClock]:
        """Have the quantizer's collectives report their time here (a hook it offers, not a patch of it)."""
        from vqmodels.quantize import dist as qdist

        qdist.set_collective_timer(cls._add)
        return cls

    @classmethod
    def _add(cls, seconds: float) -> None:
        cls.seconds += seconds


class Throughput:
    """Images per second of the training steps: the time from one step's end to the next, so data
    loading and logging count, while eval, images and checkpoints (`pause()` after them) do not.
    Also the share of that time spent syncing the codebook (`SyncClock`)."""

    def __init__(self, world_size: int = 1, window: int = 50, warmup: int = 5):
        self.world_size = world_size  # images are counted over all ranks, CPU time is this process's
        self.recent: deque[tuple[int, float, float]] = deque(maxlen=window)
        self.warmup = warmup
        self.ticks = 0
        self.total_images = 0
        self.total_seconds = 0.0
        self.total_sync = 0.0
        self.total_cpu = 0.0
        self._last: float | None = None
        self._sync = SyncClock.seconds
        self._cpu = time.process_time()

    def pause(self) -> None:
        """Restart the clock: the time since the last tick was not training."""
        self._last, self._sync, self._cpu = time.perf_counter(), SyncClock.seconds, time.process_time()

    def tick(self, images: int) -> None:
        now, sync, cpu = time.perf_counter(), SyncClock.seconds, time.process_time()
        if self._last is not None:
            dt, ds = now - self._last, sync - self._sync
            self.recent.append((images, dt, ds))
            self.ticks += 1
            if self.ticks > self.warmup:  # the first steps include k-means init and allocator warm-up
                self.total_images += images
                self.total_seconds += dt
                self.total_sync += ds
                self.total_cpu += cpu - self._cpu
        self._last, self._sync, self._cpu = now, sync, cpu

    def rate(self) -> float | None:
        """Over the last `window` steps (what the progress bar shows)."""
        seconds = sum(s for _, s, _ in self.recent)
        return sum(i for i, _, _ in self.recent) / seconds if seconds > 0 else None

    def sync_share(self) -> float | None:
        seconds = sum(s for _, s, _ in self.recent)
        return sum(d for _, _, d in self.recent) / seconds if seconds > 0 else None

    def steady_rate(self) -> float | None:
        """Over every step after the warm-up ones (what the benchmark reports)."""
        return self.total_images / self.total_seconds if self.total_seconds > 0 else None

    def steady_sync_share(self) -> float | None:
        return self.total_sync / self.total_seconds if self.total_seconds > 0 else None

    def summary(self) -> dict[str, float]:
        """The steady-state figures, logged at the end of a job and read by bench/train_throughput.py."""
        out = {}
        if self.steady_rate() is not None:
            out["train/images_per_s_steady"] = float(self.steady_rate())
            out["train/codebook_sync_share_steady"] = float(self.steady_sync_share() or 0.0)
        if self.total_cpu > 0:  # this process's CPU time (not the dataloader workers'): stable on a busy machine
            out["train/images_per_cpu_s_steady"] = self.total_images / self.world_size / self.total_cpu
        return out


# ---------------------------------------------------------------------------------------- step logging

STEADY_EVERY = 10  # steps between points of the `*_steady` throughput lines


def log_train_step(
    env: Any, step: int, metrics: dict[str, Any], opt: torch.optim.Optimizer, grad_norm: float | torch.Tensor,
    batches: TrainBatches, rate: Throughput, codebook_sync: bool = False,
) -> None:
    """Rank 0: add what every training loop logs each step (lr, gradient norm, skipped samples, throughput
    and, with a codebook, the share of time spent syncing it), then log to MLflow and the progress bar.
    Metrics may be device tensors: they are read back only when logged or shown, not every step."""
    metrics["train/lr"] = opt.param_groups[0]["lr"]
    metrics["train/grad_norm"] = grad_norm
    metrics["train/skipped_samples"] = float(batches.skipped)
    if rate.rate() is not None:
        metrics["train/images_per_s"] = rate.rate()
        if codebook_sync:
            metrics["train/codebook_sync_share"] = rate.sync_share()
    if step % STEADY_EVERY == 0:  # the running steady-state figures: a line that settles, not one end point
        metrics.update(rate.summary())
    env.run.log_metrics(metrics, step)
    env.progress.update(step, metrics, rate.rate())


def log_eval(env: Any, step: int, metrics: dict[str, float], last: bool) -> None:
    """Rank 0: log held-out metrics; the last evaluation is also kept as `eval/final.json`. What is the same at
    every pass (images evaluated, bits per image) becomes a run tag (`vqtrain.eval.images`), not a flat chart."""
    from jobs.tracking import split_constants

    charted, constants = split_constants(metrics)
    env.run.log_metrics(charted, step)
    for key, value in constants.items():
        env.run.set_tag(f"vqtrain.{key.replace('/', '.')}", f"{value:g}")
    if last:
        env.run.log_text(json.dumps({"step": step, **metrics}, indent=2), "eval/final.json")
