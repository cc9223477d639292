"""`python -m jobs.run SPEC` — the jobs' entry point (what `vqtrain run` and the Ray Jobs API start).

The driver validates the spec, connects to Ray (`VQTRAIN_RAY_ADDRESS` / `RAY_ADDRESS` unless they
hold an http(s) Jobs API address, else a private local Ray), creates or resumes the job's MLflow run
(found again by the `VQTRAIN_JOB_ID` tag, so a resubmitted job keeps one run), starts Ray Train's
TorchTrainer with the kind's loop, prints rank 0's progress as `VQTRAIN_PROGRESS {...}` lines and ends
with one `VQTRAIN_RESULT {...}` line. Exit status: 0 done, 2 invalid spec, 1 the job failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from jobs.spec import (
    SHARED_ROOTS_ENV,
    JobSpec,
    SpecError,
    absolute_paths,
    cluster_storage_errors,
    load_spec,
    parse_spec,
    parse_text,
    upgrade_stored,
)
from vqbase.protocol import JOB_ID_ENV, RAY_ADDRESS_ENV, read_spec_env


def job_loop(kind: str) -> Callable[[dict[str, Any]], None]:
    """The Ray Train loop of a job kind (what every worker runs), imported for that kind only: each loop's
    module brings its model library."""
    if kind == "tokenizer":
        from jobs.train_tokenizer import train_loop

        return train_loop
    if kind == "maskgit":
        from jobs.train_maskgit import train_loop

        return train_loop
    if kind == "tokenize":
        from jobs.tokenize import tokenize_loop

        return tokenize_loop
    if kind == "eval":
        from jobs.eval_job import eval_loop

        return eval_loop
    raise KeyError(kind)


ADDRESS_VARS = (RAY_ADDRESS_ENV, "RAY_ADDRESS")


def ray_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The cluster to join: `$VQTRAIN_RAY_ADDRESS`, else `$RAY_ADDRESS` (Ray sets it inside a Ray job),
    else None. `http(s)://` values are skipped: that is a Ray Jobs API address (the service's
    `VQTRAIN_RAY_ADDRESS`, or the `RAY_ADDRESS` that `ray job submit` reads), not one `ray.init` takes."""
    env = os.environ if environ is None else environ
    for var in ADDRESS_VARS:
        value = (env.get(var) or "").strip()
        if value and not value.lower().startswith(("http://", "https://")):
            return value
    return None


def ray_init_kwargs(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`ray.init` arguments: join the configured cluster, else start a private local Ray
    (`address="local"`, so a `ray start` head elsewhere on the machine is never joined by accident)
    without a dashboard, which a one-job Ray does not need."""
    address = ray_address(environ)
    if address is None:
        return {"address": "local", "include_dashboard": False, "log_to_driver": True}
    return {"address": address, "log_to_driver": True}  # the cluster decides about its dashboard


def connect_ray() -> None:
    """Join the configured cluster, or start a local Ray inside this process."""
    import ray

    if ray.is_initialized():
        return
    ray.init(**ray_init_kwargs())


def workers_elsewhere() -> bool:
    """Whether this job's workers may run on other machines than its driver: the connected cluster has
    several live nodes, or a head without CPUs (workers come from nodes an autoscaler adds)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    head_cpus = sum(n["Resources"].get("CPU", 0) for n in nodes if "node:__internal_head__" in n["Resources"])
    return len(nodes) > 1 or head_cpus == 0


def run_job(
    spec: JobSpec,
    *,
    job_id: str | None = None,
    tracking_uri: str | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run one job to the end on Ray Train; returns the `VQTRAIN_RESULT` record.

    `tracking_uri` defaults to $MLFLOW_TRACKING_URI, else the embedded local server. Progress lines go
    to `out` (default stdout). Raises `JobFailed` when training fails after `resources.max_failures`
    restarts.
    """
    import ray
    from mlflow import MlflowClient

    from jobs import tracking
    from jobs.checkpoints import checkpoint_storage
    from jobs.progress import ProgressPrinter, ProgressSink

    preflight(spec)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout carries progress lines
    job_id = job_id or os.environ.get(JOB_ID_ENV) or f"{spec.name}-{uuid.uuid4().hex[:8]}"
    tracking_uri = tracking_uri or tracking.resolve_tracking_uri()
    connect_ray()
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    spec, result = _open_run(client, spec, job_id, tracking_uri)
    run_id = result["run_id"]
    storage = checkpoint_storage(spec.checkpoint.storage, spec.data.storage_options)  # may fail: before the actor
    sink = ProgressSink.remote()
    trainer = _trainer(spec, job_id, run_id, tracking_uri, sink, storage)
    try:
        with ProgressPrinter(sink, out):
            fit = trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C in `vqtrain run`: the run stays resumable with the same --job-id
        client.set_terminated(run_id, status="KILLED")
        raise
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        raise JobFailed(f"job {job_id} failed: {e}", result) from e
    finally:
        ray.kill(sink)
    if getattr(fit, "error", None) is not None:
        client.set_terminated(run_id, status="FAILED")
        raise JobFailed(f"job {job_id} failed: {fit.error}", result)
    _finish(client, spec, fit, result)
    client.set_terminated(run_id, status="FINISHED")
    return result


def _open_run(client: Any, spec: JobSpec, job_id: str, tracking_uri: str) -> tuple[JobSpec, dict[str, Any]]:
    """Check cluster storage, open (or reopen) the job's MLflow run and pin every registry reference.

    Returns the spec with `tokenizer:` / `evaluate:` pinned to versions, and the result record so far."""
    from jobs import provenance, tracking
    from vqbase.protocol import parse_roots

    if workers_elsewhere():  # `vqtrain run` or `ray job submit` on a cluster: what the service checks too
        exp = client.get_experiment_by_name(spec.tracking.experiment) or client.get_experiment("0")
        shared = parse_roots(os.environ.get(SHARED_ROOTS_ENV, ""))
        errors = cluster_storage_errors(spec, exp.artifact_location if exp is not None else None, shared)
        if errors:
            raise SpecError(errors)
    run_id, exp_id, _ = tracking.open_job_run(client, spec, job_id)
    # `tokenizer: models:/name@alias` is resolved once, here, and recorded on the run: every worker, restart
    # and resume of this job then loads the same version even if the alias moves meanwhile
    spec = spec.model_copy(update={"tokenizer": tracking.pin_tokenizer(client, run_id, spec.tokenizer)})
    if spec.tokenizer and spec.tokenizer.startswith("models:"):  # the description names the pinned version
        client.set_tag(run_id, "mlflow.note.content", provenance.run_description(spec, job_id))
    if spec.kind == "eval":  # the version judged is fixed at the start, like a stage-two job's tokenizer
        spec = spec.model_copy(update={"evaluate": pin_evaluated(client, run_id, spec.evaluate)})
    result = {
        "run_id": run_id,
        "run_url": tracking.run_url(tracking_uri, exp_id, run_id),
        "ui_url": tracking.ui_url(tracking_uri),
        "model_uri": None,
        "job_id": job_id,
    }
    return spec, result


def _trainer(spec: JobSpec, job_id: str, run_id: str, tracking_uri: str, sink: Any,
             storage: tuple[str, Any]) -> Any:
    """The Ray Train `TorchTrainer` of this job: its loop, workers, checkpoint storage and restarts."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.job import loop_config

    r = spec.resources
    storage_path, storage_fs = storage
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        job_loop(spec.kind),
        train_loop_config=loop_config(spec, run_id=run_id, tracking_uri=tracking_uri, job_id=job_id, sink=sink),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=job_id,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        ),
    )


def _finish(client: Any, spec: JobSpec, fit: Any, result: dict[str, Any]) -> None:
    """Complete `result` from the finished run: the registered model, the output, the final evaluation."""
    from jobs import tracking
    from jobs.judges import SKIPPED_TAG

    run_id = result["run_id"]
    metrics = fit.metrics or {}
    run = client.get_run(run_id)
    tags = run.data.tags
    # Ray Train hands back the metrics of the last *checkpointed* report, so what the loops produce at
    # the very end travels through the run's tags
    result["model_uri"] = tags.get(tracking.MODEL_URI_TAG)
    if tags.get(tracking.OUTPUT_TAG):
        result["output"] = tags[tracking.OUTPUT_TAG]
    if tags.get(SKIPPED_TAG):  # "metric: why; ..." as the judges recorded it
        parts = (p.split(": ", 1) for p in tags[SKIPPED_TAG].split("; ") if ": " in p)
        result["not_computed"] = {metric: why for metric, why in parts}
    if spec.kind == "eval":
        result["model"] = spec.evaluate
        result["metrics"] = eval_result(run.data.metrics, tags.get(tracking.EVALUATED_KIND_TAG))
    elif spec.kind in ("tokenizer", "maskgit"):  # the final evaluation, for the user's terminal
        result["metrics"] = eval_result(run.data.metrics, spec.kind, run.data.tags)
    if metrics.get("train/images_per_s_steady") is not None:
        result["images_per_s"] = metrics["train/images_per_s_steady"]
    if fit.checkpoint is not None:
        result["checkpoint"] = fit.checkpoint.path


def pin_evaluated(client: Any, run_id: str, uri: str) -> str:
    """An eval job's model as one version, recorded on its run (a restart judges the same version)."""
    from jobs import tracking

    pinned = client.get_run(run_id).data.tags.get(tracking.EVALUATED_TAG)
    if pinned is None:
        try:
            pinned = tracking.pin_model_uri(client, uri)
        except Exception as e:  # noqa: BLE001 - an unknown name or alias: the spec's fault
            client.set_terminated(run_id, status="FAILED")
            raise SpecError([{"loc": "evaluate", "msg": f"cannot find {uri} in the registry: {e}"[:500]}]) from e
        client.set_tag(run_id, tracking.EVALUATED_TAG, pinned)
    return pinned


def eval_result(run_metrics: dict[str, float], kind: str | None,
                tags: dict[str, str] | None = None) -> dict[str, float | None]:
    """An eval job's numbers as `vqtrain eval --json` prints them: `eval/` prefix dropped, the kind's
    headline metrics always present (null when not computed). A training run keeps its constants (images
    evaluated, bits per image) as `vqtrain.eval.*` tags: they are added back."""
    required = {"tokenizer": ("psnr", "ssim", "lpips", "rfid"), "maskgit": ("fid", "inception_score", "nll", "class_acc")}
    out: dict[str, float | None] = {k.split("/", 1)[1]: v for k, v in run_metrics.items() if k.startswith("eval/")}
    from jobs.tracking import CONSTANT_SUFFIXES

    for key, value in (tags or {}).items():
        name = key.removeprefix("vqtrain.eval.")
        if key.startswith("vqtrain.eval.") and f"/{name}" in CONSTANT_SUFFIXES:
            out[name] = float(value)
    for key in required.get(kind or "", ()):
        out.setdefault(key, None)
    return out


def preflight(spec: JobSpec) -> None:
    """Fail before anything starts (no run, no workers) when the model config cannot be built or the
    data cannot be found (or lies outside `$VQTRAIN_ALLOWED_ROOTS`); the SpecError names the field."""
    from jobs.build import tokenizer_config
    from jobs.data.manifest import resolve_shards
    from vqbase.protocol import allowed_roots_from_env

    if spec.kind == "tokenizer":
        tokenizer_config(spec)
    roots = allowed_roots_from_env()  # set when the service started this job
    for loc, source in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        if source is None:
            continue
        try:
            resolve_shards(source, spec.data.storage_options, roots)
        except (OSError, ValueError) as e:
            raise SpecError([{"loc": loc, "msg": f"cannot read the shards: {e}"}]) from e


class JobFailed(RuntimeError):
    """Training failed for good; `.result` still names the run (its logs and metrics are in MLflow)."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


def _read_spec(args: argparse.Namespace) -> JobSpec:
    if args.spec_env is not None:  # how the service passes it: never in argv, which /proc shows to everyone
        text = read_spec_env(args.spec_env)
        if text is None:
            raise SpecError([{"loc": "", "msg": f"--spec-env: ${args.spec_env} is not set"}])
        # how the service hands over a stored spec, which may predate today's rules
        return parse_spec(upgrade_stored(parse_text(text, f"${args.spec_env}")))
    if args.spec_json is not None:
        return parse_spec(parse_text(args.spec_json, "--spec-json"))
    if args.spec is None:
        raise SpecError([{"loc": "", "msg": "give a spec file or --spec-json"}])
    path = Path(args.spec)
    spec = load_spec(path)
    # relative paths in a spec file are relative to the file (workers run elsewhere)
    return absolute_paths(spec, path.resolve().parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", help="path of the job spec (YAML or JSON)")
    parser.add_argument("--spec-json", help="the spec itself, as JSON/YAML text")
    parser.add_argument("--spec-env", metavar="VAR", help="read the spec (JSON/YAML text) from this environment variable")
    parser.add_argument("--job-id", help="job id (default: $VQTRAIN_JOB_ID or a new one)")
    args = parser.parse_args(argv)
    try:
        spec = _read_spec(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    try:
        result = run_job(spec, job_id=args.job_id)
    except JobFailed as e:
        print(f"vqtrain: {e}", file=sys.stderr)
        print(f"vqtrain: run {e.result['run_url']}", file=sys.stderr)
        return 1
    except SpecError as e:  # raised by the config mapping before any worker started
        print(str(e), file=sys.stderr)
        return 2
    from vqbase.protocol import result_line

    print(result_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
