"""The one helpers module of the training jobs: worker context, seeding, DDP, schedule, precision,
data, checkpoints and the test hooks (progress reporting and per-step logging: `jobs.progress`).

Every job loop (tokenizer, maskgit, tokenize) runs inside a Ray Train worker and uses these; nothing
here knows about a particular model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from jobs.progress import Progress, Throughput

RESULT_PREFIX = "VQTRAIN_RESULT "
STATE_FILE = "state.pt"


# --------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class Worker:
    """Where this training process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def worker_context(cpus_per_worker: int = 1) -> Worker:
    """Rank, world size and device of the calling Ray Train worker (single process outside Ray Train)."""
    try:
        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    except Exception:  # not inside a Ray Train worker (benchmarks, debugging)
        rank, world, local = 0, 1, 0
    torch.set_num_threads(max(1, int(cpus_per_worker)))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Worker(rank, world, local, device)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; ranks get different streams so their data augmentation differs."""
    s = int(seed) * 1000 + int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """All RNG states of this process, for the checkpoint (a resumed job continues the same streams)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_ddp(model: torch.nn.Module, worker: Worker, ignore_prefix: str | None = None) -> torch.nn.Module:
    """DDP that syncs buffers once, at construction, but not before every forward: the quantizer keeps its
    buffers (EMA statistics, usage, running affine) identical across ranks through its own collectives.

    Parameters and buffers under `ignore_prefix` (e.g. "discriminator.") are left out of DDP; the
    caller syncs them itself (`average_gradients`).
    """
    model = model.to(worker.device)
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ignore_prefix:
        names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()] if n.startswith(ignore_prefix)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)

    ids = [worker.device.index] if worker.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=False)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process); used to pool eval statistics."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant or cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's `base_lr` (set when the optimiser is built), keeping per-group multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


class Precision:
    """Autocast and gradient scaling for the spec's `optim.precision` (fp32 | bf16 | fp16)."""

    def __init__(self, precision: str, device: torch.device):
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        grad_clip: float | None,
        sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    ) -> float | torch.Tensor:
        """zero_grad, backward, (sync gradients,) unscale, clip and step; returns the gradient norm
        before clipping (0 when clipping is off), as a device tensor: reading it here would make every
        step wait for the GPU."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if sync is not None:
            sync(params)
        norm = 0.0
        if grad_clip:
            self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).detach()
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over ranks in one flat all-reduce, for a module trained outside DDP
    (the tokenizer's discriminator, whose parameters the generator's DDP ignores)."""
    if not is_distributed():
        return
    for p in params:  # every rank must contribute the same layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# ---------------------------------------------------------------------------------------------- data

SKIP_SYNC_EVERY = 50  # steps between sums of the ranks' skipped-sample counts


class TrainBatches:
    """Endless training batches over epochs, positioned at `start_step`.

    A resumed job sees the same data order as an uninterrupted one: it re-enters the epoch it was in at the
    batch it had reached. The loader skips the used part of the epoch before decoding anything, so even a
    resume deep into a long epoch costs only the reading of the skipped samples.
    """

    def __init__(self, loader: Any, start_step: int = 0, skipped_before: int = 0):
        self.loader = loader
        self.skipped_before = skipped_before  # all ranks' skipped samples up to the checkpoint resumed from
        self._skipped = skipped_before
        epoch, skip = divmod(start_step, len(loader))
        loader.set_epoch(epoch, skip_batches=skip)
        self._it = self._batches()

    def _batches(self) -> Iterator[Any]:
        while True:  # each full pass advances the loader's epoch (and ends any resume skip)
            yield from self.loader

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def sync_skipped(self, step: int, device: torch.device, at_checkpoint: bool) -> None:
        """Sum the ranks' skipped-sample counts every SKIP_SYNC_EVERY steps and at checkpoints. A collective:
        every rank calls it at every step (the condition depends on the step only)."""
        if step % SKIP_SYNC_EVERY and not at_checkpoint:
            return
        local = torch.tensor([float(self.loader.skipped)], dtype=torch.float64, device=device)
        self._skipped = self.skipped_before + int(all_reduce_sum(local).item())

    @property
    def skipped(self) -> int:
        """Samples skipped by all ranks since the job began (undecodable or lost in a broken shard), as of the
        last `sync_skipped`; saved in checkpoints, so a resumed job keeps counting."""
        return self._skipped


def image_loader(spec: Any, worker: Worker, train: bool) -> Any | None:
    """The data issue's per-rank image loader for `data.train` (train=True) or `data.eval` (None if unset);
    local shards must lie under the service's allowed roots when the job runs under the service."""
    from jobs.data.loader import make_image_loader
    from jobs.data.storage import allowed_roots_from_env

    d = spec.data
    source = d.train if train else d.eval
    if source is None:
        return None
    return make_image_loader(
        source,
        image_size=d.image_size,
        batch_size=spec.optim.batch_size,
        train=train,
        rank=worker.rank,
        world_size=worker.world_size,
        num_workers=d.num_workers,
        seed=spec.optim.seed,
        shuffle_buffer=d.shuffle_buffer,
        epoch_batches=d.epoch_batches if train else None,
        storage_options=d.storage_options,
        allowed_roots=allowed_roots_from_env(),
        pin_memory=worker.device.type == "cuda",
    )


def train_batches(spec: Any, worker: Worker, start_step: int = 0, skipped_before: int = 0) -> TrainBatches:
    return TrainBatches(image_loader(spec, worker, train=True), start_step, skipped_before)


def eval_batches(spec: Any, worker: Worker) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every eval sample exactly once across ranks (padding and undecodable samples dropped), or None
    without an eval split. Every rank gets the same number of batches, possibly empty ones."""
    loader = image_loader(spec, worker, train=False)
    if loader is None:
        return None
    return ((b.images[b.valid], b.labels[b.valid]) for b in loader)


# ---------------------------------------------------------------------------------------- checkpoint


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


TIME_CHECK_EVERY = 10  # steps between the ranks' agreement on a wall-clock checkpoint


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


def checkpoint_storage(storage: str | None, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig; `s3://` goes through s3fs so that the
    spec's endpoint and keys apply."""
    if storage is None:
        # `$VQTRAIN_HOME` or ~/.vqtrain, as the service's `embedded.vqtrain_home` resolves it (jobs never import
        # service code); created 0700 like there
        home = Path(os.environ.get("VQTRAIN_HOME") or "~/.vqtrain").expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return str(home / "checkpoints"), None
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


# ---------------------------------------------------------------------------------------- test hooks

TEST_HOOK_PREFIX = "VQTRAIN_TEST_"


def test_hooks_from_env() -> dict[str, str]:
    """Driver side: the `VQTRAIN_TEST_*` variables, passed to the workers with the loop config."""
    return {k: v for k, v in os.environ.items() if k.startswith(TEST_HOOK_PREFIX)}


def maybe_kill(step: int, worker: Worker, hooks: dict[str, str]) -> None:
    """Fault injection for the resume test: `VQTRAIN_TEST_KILL_AT_STEP=N` kills the process of rank
    `VQTRAIN_TEST_KILL_RANK` (default: the last rank) once, before step N; the marker file
    `VQTRAIN_TEST_KILL_MARKER` records that it happened so the restarted worker goes on.

    `VQTRAIN_TEST_KILL_DELAY_S` waits before dying: Ray Train registers a reported checkpoint at its next
    poll of the workers (every 2 s), and a worker that dies before that poll takes the report with it,
    so the job would restart from the checkpoint before. A test that asserts the resume step waits.
    """
    _maybe_pause(step, worker, hooks)
    at = hooks.get("VQTRAIN_TEST_KILL_AT_STEP")
    if at is None or step != int(at):
        return
    rank = int(hooks.get("VQTRAIN_TEST_KILL_RANK", worker.world_size - 1))
    marker = Path(hooks.get("VQTRAIN_TEST_KILL_MARKER", Path(tempfile.gettempdir()) / "vqtrain-kill-marker"))
    if worker.rank != rank or marker.exists():
        return
    time.sleep(float(hooks.get("VQTRAIN_TEST_KILL_DELAY_S", 0)))
    marker.write_text(f"killed rank {worker.rank} at step {step}\n")
    os._exit(1)


def _maybe_pause(step: int, worker: Worker, hooks: dict[str, str]) -> None:
    """Fault injection from outside (the cluster tests): `VQTRAIN_TEST_PAUSE_AT_STEPS=15,25` makes every rank
    write `<VQTRAIN_TEST_PAUSE_DIR>/reached-<step>-rank<r>` (its node and pid inside) before those steps and
    wait there until `release-<step>` exists, so a test can remove a node or a placement group at a known
    point of a live job."""
    steps = hooks.get("VQTRAIN_TEST_PAUSE_AT_STEPS")
    if not steps or step not in {int(s) for s in steps.split(",")}:
        return
    folder = Path(hooks["VQTRAIN_TEST_PAUSE_DIR"])
    node = ray.get_runtime_context().get_node_id()
    _write_atomic(folder / f"reached-{step}-rank{worker.rank}", json.dumps({"node": node, "pid": os.getpid()}))
    while not (folder / f"release-{step}").exists():
        time.sleep(0.2)


def record_codebook(env: JobEnv, codebook: torch.Tensor) -> None:
    """Test hook: `VQTRAIN_TEST_CODEBOOK_DIR` gets each rank's final codebook digest and node id (the cluster
    tests compare ranks that ran on different nodes)."""
    folder = env.hooks.get("VQTRAIN_TEST_CODEBOOK_DIR")
    if not folder:
        return
    import hashlib

    digest = hashlib.sha256(codebook.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    node = ray.get_runtime_context().get_node_id()
    _write_atomic(Path(folder, f"codebook-rank{env.worker.rank}"), json.dumps({"sha256": digest, "node": node}))


def _write_atomic(path: Path, text: str) -> None:
    """Whole or absent: the test polling for the file never reads half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- the job


@dataclass
class JobEnv:
    """What every job loop starts from: the validated spec, this worker, and (rank 0 only) the run."""

    spec: Any  # jobs.spec.JobSpec
    worker: Worker
    run: Any | None  # jobs.tracking.RunLogger on rank 0, None elsewhere
    progress: Progress
    hooks: dict[str, str]
    job_id: str
    clock: CheckpointClock  # when to checkpoint (steps, wall-clock minutes, the last step)


def loop_config(spec: Any, *, run_id: str, tracking_uri: str, job_id: str, sink: Any) -> dict[str, Any]:
    """Driver side: the `train_loop_config` every job loop receives (plain data + the sink's handle)."""
    from jobs.data.storage import allowed_roots_from_env

    return {
        "spec": spec.model_dump(mode="json"),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "job_id": job_id,
        "sink": sink,
        "hooks": test_hooks_from_env(),
        "allowed_roots": allowed_roots_from_env(),  # workers on a cluster joined by hand lack the driver's env
    }


def open_job(config: dict[str, Any]) -> JobEnv:
    """Worker side: validate the spec again, find this worker's place, open the run on rank 0."""
    from jobs.spec import JobSpec

    spec = JobSpec.model_validate(config["spec"])
    worker = worker_context(int(spec.resources.cpus_per_worker))
    if config.get("tracking_uri"):
        # this process belongs to the job: every MLflow call in it (registry lookups of
        # `tokenizer: models:/...` included) goes to the job's server, whatever registry URI the
        # worker inherited from whoever started Ray
        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
        os.environ["MLFLOW_REGISTRY_URI"] = config["tracking_uri"]
    if config.get("allowed_roots") is not None:  # read by the loaders (`allowed_roots_from_env`)
        from jobs.data.storage import ALLOWED_ROOTS_ENV

        os.environ[ALLOWED_ROOTS_ENV] = json.dumps(config["allowed_roots"])
    run = None
    if worker.is_main and config.get("run_id"):
        from jobs.tracking import RunLogger

        run = RunLogger(config["tracking_uri"], config["run_id"], system_metrics=spec.tracking.system_metrics)
    progress = Progress(config.get("sink"), spec.optim.steps, worker)
    c = spec.checkpoint
    clock = CheckpointClock(c.every, c.every_minutes, spec.optim.steps, worker.device)
    return JobEnv(spec, worker, run, progress, dict(config.get("hooks") or {}), config.get("job_id", ""), clock)
