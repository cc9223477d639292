"""What every job kind shares around its work: the driver's `loop_config`, then in each Ray Train worker
`open_job` (the spec validated again, this worker's place, rank 0's MLflow run) and `finish_job` (rank 0's
last logging and the run's close, then every rank's final report).

The training kinds run their step loop in `jobs.trainer`; kind=tokenize (`jobs.tokenize`) has its own work
between the two; kind=eval (`jobs.eval_job`) opens with `open_job` and makes its one report itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.checkpoints import CheckpointClock
from jobs.progress import Progress
from jobs.testhooks import test_hooks_from_env
from jobs.worker import Worker, worker_context
from vqbase.protocol import ALLOWED_ROOTS_ENV


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
    tracking_uri: str | None = None  # the job's MLflow server (registry lookups of `tokenizer: models:/...`)


def loop_config(spec: Any, *, run_id: str, tracking_uri: str, job_id: str, sink: Any) -> dict[str, Any]:
    """Driver side: the `train_loop_config` every job loop receives (plain data + the sink's handle)."""
    from vqbase.protocol import allowed_roots_from_env

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
        os.environ[ALLOWED_ROOTS_ENV] = json.dumps(config["allowed_roots"])
    run = None
    if worker.is_main and config.get("run_id"):
        from jobs.tracking import RunLogger

        run = RunLogger(config["tracking_uri"], config["run_id"], system_metrics=spec.tracking.system_metrics)
    progress = Progress(config.get("sink"), spec.optim.steps, worker)
    c = spec.checkpoint
    clock = CheckpointClock(c.every, c.every_minutes, spec.optim.steps, worker.device)
    return JobEnv(spec, worker, run, progress, dict(config.get("hooks") or {}), config.get("job_id", ""), clock,
                  config.get("tracking_uri"))


def finish_job(env: JobEnv, result: dict[str, Any], on_main: Callable[[], None]) -> None:
    """The end of every job kind: rank 0 runs `on_main` (its last logging, which may add to `result`, e.g. the
    registered model's URI) and closes the run; then every rank makes the final `ray.train.report(result)`,
    which carries the result to the driver."""
    import ray.train

    if env.worker.is_main:
        on_main()
        env.run.close()
    ray.train.report(result)
