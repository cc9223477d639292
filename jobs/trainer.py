"""The training loop of both stages, written once (`train`), and what each model supplies to it (`Task`).

`train` runs in every Ray Train worker, top to bottom: open the job, build the task (models, optimisers, the
eval networks), seed, resume from the latest checkpoint, then step until `optim.steps` with evaluations,
pictures and checkpoints at their steps, and finish: rank 0 logs the summary and registers the model, every
rank makes the final report. `jobs.train_tokenizer` and `jobs.train_maskgit` each supply one `Task`.

Checkpoints go through `ray.train.report`, so a restarted worker group resumes at the same step with the
same model, optimisers, data position and RNG streams. Rank 0 logs to MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from jobs import model_card
from jobs.batches import TrainBatches
from jobs.checkpoints import load_checkpoint, maybe_checkpoint
from jobs.job import JobEnv, finish_job, open_job
from jobs.optim import lr_factor
from jobs.progress import Throughput, log_eval, log_train_step
from jobs.testhooks import maybe_kill
from jobs.worker import seed_everything


class Step(NamedTuple):
    """What one training step hands back to the loop."""

    metrics: dict[str, Any]  # logged by rank 0 (device tensors are fine: read back only when logged)
    images: int  # this rank's batch size
    grad_norm: float | torch.Tensor  # the main optimiser's, before clipping


class Task:
    """What one kind of model supplies to `train`. Built in every worker (the constructor builds the models,
    optimisers and judges, with the same initial weights on every rank); the loop calls the rest."""

    env: JobEnv
    optimizer: torch.optim.Optimizer  # the one whose learning rate is logged as `train/lr`
    codebook_sync: bool = False  # log the share of step time spent syncing a codebook
    step_zero_needs_batch: bool = False  # the step-0 pictures come from the first training batch

    def train_loader(self) -> Any:
        """The per-rank training loader (wrapped by `TrainBatches`, positioned at the resume step)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's checkpoint (the loop adds `skipped_samples` and `step`)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def set_lr(self, factor: float) -> None:
        """Scale every optimiser's base learning rate (the schedule's factor at this step)."""
        raise NotImplementedError

    def prepare(self, batch: Any) -> Any:
        """A loader batch as `train_step` takes it (on the device)."""
        raise NotImplementedError

    def train_step(self, batch: Any, step: int) -> Step:
        """One optimiser step (every rank) at `step`, before the loop counts it."""
        raise NotImplementedError

    def evaluate(self, step: int, last: bool) -> dict[str, float] | None:
        """Every rank: the held-out metrics (None when there are none); the loop logs them on rank 0."""
        raise NotImplementedError

    def log_eval_figures(self, step: int) -> None:
        """Rank 0, after an evaluation's metrics are logged: pictures of that evaluation."""

    def log_pictures(self, step: int) -> None:
        """Rank 0: the model's pictures at `step`."""
        raise NotImplementedError

    def log_step_zero(self) -> None:
        """A fresh start's pictures of the untrained model at step 0 (MLflow's image cards open there)."""
        if self.env.worker.is_main:
            self.log_pictures(0)

    def finishing(self) -> None:
        """Every rank, after the last step, before rank 0 registers the model."""

    def register(self, final: dict[str, float]) -> str:
        """Rank 0: log the trained model to the run and register it (`final`: the last evaluation's metrics);
        returns its model URI."""
        raise NotImplementedError


def train(config: dict[str, Any], make: Callable[[JobEnv], Task]) -> None:
    """The Ray Train entry point of a training job, `make` building its model's task."""
    env = open_job(config)
    worker, o, t = env.worker, env.spec.optim, env.spec.tracking
    task = make(env)
    seed_everything(o.seed, worker.rank)
    step, skipped_before = resume(env, task)
    batches = TrainBatches(task.train_loader(), step, skipped_before)
    step_zero = step == 0 and bool(t.image_every)  # a fresh start: pictures of the untrained model
    if step_zero and not task.step_zero_needs_batch:
        task.log_step_zero()
        step_zero = False
    final: dict[str, float] = {}  # the last evaluation's metrics, for the model card
    rate = Throughput(worker.world_size)
    rate.pause()
    env.clock.saved()  # the wall-clock window opens with training, not with model building and resuming
    while step < o.steps:
        maybe_kill(step, worker, env.hooks)
        task.set_lr(lr_factor(step, o.steps, o.warmup_steps, o.schedule))
        batch = task.prepare(next(batches))
        if step_zero:
            task.log_step_zero()
            rate.pause()
            step_zero = False
        out = task.train_step(batch, step)
        step += 1
        rate.tick(out.images * worker.world_size)
        batches.sync_skipped(step, worker.device, env.clock.due(step))
        if worker.is_main:
            log_train_step(env, step, out.metrics, task.optimizer, out.grad_norm, batches, rate,
                           codebook_sync=task.codebook_sync)

        last = step == o.steps
        if (t.eval_every and step % t.eval_every == 0) or last:
            metrics = task.evaluate(step, last)
            if metrics is not None:
                final = metrics
                if worker.is_main:
                    log_eval(env, step, metrics, last)
                    task.log_eval_figures(step)
            rate.pause()
        if worker.is_main and ((t.image_every and step % t.image_every == 0) or last):
            task.log_pictures(step)
            rate.pause()
        maybe_checkpoint(env, step, lambda: {**task.state_dict(), "skipped_samples": batches.skipped}, rate)

    finish(env, task, rate, final)


def resume(env: JobEnv, task: Task) -> tuple[int, int]:
    """(step, skipped samples) of the latest checkpoint, whose state the task takes back; (0, 0) on a fresh
    start. Rank 0 logs `train/resumed_from`."""
    state = load_checkpoint(env.worker)
    if state is None:
        return 0, 0
    task.load_state_dict(state)
    step = int(state["step"])
    if env.run is not None:
        env.run.log_metrics({"train/resumed_from": step}, step, replay=False)
    return step, int(state.get("skipped_samples", 0))


def finish(env: JobEnv, task: Task, rate: Throughput, final: dict[str, float]) -> None:
    """Rank 0 logs the steady-state throughput and registers the model; every rank then makes the last
    report, which carries the model URI to the driver."""
    result: dict[str, Any] = rate.summary()
    task.finishing()

    def log_and_register() -> None:
        env.run.log_metrics(result, env.spec.optim.steps)
        env.run.flush()
        result["model_uri"] = task.register(final)

    finish_job(env, result, log_and_register)


def log_model(env: JobEnv, kind: str, net: Any, save: Callable[[Path], Any], final: dict[str, float],
              judges: Any, *, dataset: Any, grid: tuple[int, ...], example: Any) -> str:
    """Rank 0: log a trained model (written by `save(folder)`) as the run's pyfunc model and register it
    (once per run, also across restarts), with its model card: what it is, the final evaluation on `dataset`
    and that evaluation's protocol, its signature (codes on a `grid`) and input `example`."""
    spec = env.spec
    card = model_card.card_tags(spec, kind, net)
    if final:
        card.update(model_card.eval_tags(model_card.dataset_name(dataset), final, judges.protocol, judges.skipped))
    with tempfile.TemporaryDirectory(prefix="vqtrain-model-") as tmp:
        model_dir = Path(tmp) / kind
        save(model_dir)
        return env.run.log_model(
            model_dir, kind, spec.model_name, spec.register.alias, step=spec.optim.steps, card=card, metrics=final,
            signature=model_card.signature(kind, spec.data.image_size, grid), input_example=example)

