"""Checkpoints through Ray Train: what a job saves and restores (rank 0's model state, every rank's RNG
streams), when it saves (`CheckpointClock`: steps, wall-clock minutes, the last step) and where
(`checkpoint_storage`: `$VQTRAIN_HOME/checkpoints`, a local folder or an object store)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
import torch.distributed as dist

from jobs.worker import Worker, is_distributed, rng_state, set_rng_state

if TYPE_CHECKING:
    from jobs.job import JobEnv
    from jobs.progress import Throughput

STATE_FILE = "state.pt"
TIME_CHECK_EVERY = 10  # steps between the ranks' agreement on a wall-clock checkpoint


def save_checkpoint(step: int, state: dict[str, Any] | None, worker: Worker, metrics: dict[str, Any]) -> None:
    """Report a checkpoint to Ray Train: rank 0 writes the model state, every rank its RNG state.

    `ray.train.report` is a barrier, so every rank calls this at the same steps. Ray merges the
    ranks' directories into one checkpoint in the run's storage.
    """
    with tempfile.TemporaryDirectory(prefix="vqtrain-ckpt-") as tmp:
        if worker.is_main and state is not None:
            torch.save({**state, "step": step}, Path(tmp) / STATE_FILE)
        torch.save(rng_state(), Path(tmp) / f"rng-{worker.rank}.pt")
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)


def load_checkpoint(worker: Worker) -> dict[str, Any] | None:
    """The latest checkpoint's state (and this rank's RNG streams restored), or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        rng = Path(d) / f"rng-{worker.rank}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))
    return state


class CheckpointClock:
    """When a loop checkpoints: every `checkpoint.every` steps, at the last step, and once
    `checkpoint.every_minutes` of wall-clock time have passed since the last checkpoint (or the loop's start),
    so a lost node or worker group costs at most those minutes plus TIME_CHECK_EVERY steps.

    `ray.train.report` is a barrier, so every rank must take the same decision although their clocks differ:
    the time rule is one MAX all-reduce every TIME_CHECK_EVERY steps (one host read per ten steps, none in
    between). `due(step)` is a collective on those steps; it is cached per step, so calling it twice in a step
    (the skipped-sample sync, then the checkpoint) is fine.
    """

    def __init__(self, every: int, every_minutes: float | None, steps: int, device: torch.device):
        self.every, self.steps, self.device = every, steps, device
        self.seconds = every_minutes * 60 if every_minutes else None
        self.since = time.monotonic()
        self._decided: tuple[int, bool] = (-1, False)

    def due(self, step: int) -> bool:
        if self._decided[0] != step:
            self._decided = (step, self._decide(step))
        return self._decided[1]

    def _decide(self, step: int) -> bool:
        if step % self.every == 0 or step >= self.steps:
            return True
        if self.seconds is None or step % TIME_CHECK_EVERY:
            return False
        late = torch.tensor([float(time.monotonic() - self.since >= self.seconds)], device=self.device)
        if is_distributed():
            dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late.item())

    def saved(self) -> None:
        self.since = time.monotonic()


def maybe_checkpoint(env: JobEnv, step: int, state: Callable[[], dict[str, Any]], rate: Throughput) -> None:
    """When `env.clock` says so (steps, minutes, last step): rank 0 flushes MLflow and saves `state()`, every
    rank reports (a barrier). `rate` is paused so the checkpoint's time is not counted as training."""
    if env.clock.due(step):
        if env.worker.is_main:
            env.run.flush()
        save_checkpoint(step, state() if env.worker.is_main else None, env.worker, rate.summary())
        env.clock.saved()
        rate.pause()


def checkpoint_storage(storage: str | None, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig; `s3://` goes through s3fs so that the
    spec's endpoint and keys apply. Without `checkpoint.storage`: `$VQTRAIN_HOME/checkpoints`."""
    if storage is None:
        from vqbase.local import vqtrain_home

        return str(vqtrain_home() / "checkpoints"), None
    if "://" not in storage or storage.startswith("file://"):
        return str(Path(storage.removeprefix("file://")).resolve()), None
    import fsspec
    import pyarrow.fs

    from jobs.data.storage import fs_options

    protocol, path = storage.split("://", 1)
    protocol = {"s3a": "s3", "gcs": "gs"}.get(protocol.lower(), protocol.lower())
    # the same option handling as shard reading: AWS-style key names, region, endpoint, {"s3": {...}}
    fs = fsspec.filesystem(protocol, **fs_options(storage, storage_options))
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
