"""MLflow for the jobs: one run per job (found again by its job-id tag after a restart), params,
buffered metrics, images, and the final model logged as a pyfunc and registered with an alias.

The driver creates or resumes the run and passes its id to the workers; only rank 0 logs into it.
Everything goes through `MlflowClient` with an explicit run id (no global "active run" state), except
`log_model`, which MLflow only offers inside `start_run`.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from jobs import provenance
from jobs.spec import JobSpec, redacted, run_params
from vqbase.fetch import resolve_version
from vqbase.uris import parse_model_uri

JOB_TAG = "vqtrain.job_id"
KIND_TAG = "vqtrain.kind"
MODEL_URI_TAG = "vqtrain.model_uri"
LOGGED_STEP_TAG = "vqtrain.logged_step"  # the highest step whose metrics reached the run
LOGGER_TAG = "vqtrain.logger"  # the newest RunLogger of the run: an older one (a worker group Ray replaced) stops
TOKENIZER_TAG = "vqtrain.tokenizer"  # the tokenizer version a stage-two/tokenize job uses, pinned at its start
EVALUATED_TAG = "vqtrain.evaluated_model"  # the model version an eval job judged
EVALUATED_KIND_TAG = "vqtrain.evaluated_kind"  # tokenizer or maskgit
MODEL_VERSION_TAG = "vqtrain.model_version"
OUTPUT_TAG = "vqtrain.output"
SPEC_ARTIFACT = "spec/spec.yaml"
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
MAX_PARAM_VALUE = 6000


CONSTANT_SUFFIXES = ("/images", "/bits_per_image")  # the same at every eval pass: run tags, not flat charts


def split_constants(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics worth a chart, constants such as the number of images evaluated)."""
    const = {k: v for k, v in metrics.items() if k.endswith(CONSTANT_SUFFIXES)}
    return {k: v for k, v in metrics.items() if k not in const}, const


def resolve_tracking_uri() -> str:
    """The configured tracking URI, or the embedded local server (`vqbase.local.tracking_uri`), exported to
    this process's MLflow calls."""
    from vqbase.local import tracking_uri

    uri = tracking_uri({"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", "")})
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def start_or_resume_run(
    client: MlflowClient, experiment: str, job_id: str, run_name: str, tags: dict[str, str] | None = None
) -> tuple[str, str, bool]:
    """(run_id, experiment_id, created): the run tagged with this job id, or a new one."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else _create_experiment(client, experiment)
    try:
        provenance.prepare_experiment(client, exp_id)
    except Exception as e:  # noqa: BLE001 - e.g. a read-only experiment: the runs still work
        print(f"vqtrain note: experiment {experiment!r} not marked for model training ({e})", file=sys.stderr)
    found = client.search_runs([exp_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1)
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, exp_id, False
    run = client.create_run(exp_id, run_name=run_name, tags={JOB_TAG: job_id, **(tags or {})})
    return run.info.run_id, exp_id, True




def open_job_run(client: MlflowClient, spec: JobSpec, job_id: str) -> tuple[str, str, bool]:
    """The job's run, created with its provenance (who, which job, a description, the shard sets as dataset
    inputs) and its spec, or found again after a restart. Returns (run_id, experiment_id, created)."""
    from vqbase.protocol import allowed_roots_from_env

    tags = {KIND_TAG: spec.kind, **provenance.run_tags(job_id, spec.kind),
            "mlflow.note.content": provenance.run_description(spec, job_id)}
    run_id, exp_id, created = start_or_resume_run(client, spec.tracking.experiment, job_id, spec.name, tags=tags)
    if created:
        log_spec(client, run_id, spec)  # params and spec/spec.yaml, storage secrets redacted
        try:  # what the UI shows about the data: never a reason to fail the job
            provenance.log_datasets(client, run_id, provenance.spec_datasets(spec, allowed_roots_from_env()))
        except Exception as e:  # noqa: BLE001
            print(f"vqtrain note: the run's datasets were not logged ({type(e).__name__}: {e})", file=sys.stderr)
    return run_id, exp_id, created


def pin_model_uri(client: MlflowClient, uri: str) -> str:
    """`models:/name@alias` → `models:/name/<version>` (the version the alias points to now), so a job and
    every restart of it use one tokenizer even if the alias moves meanwhile. Other URIs are returned as is."""
    ref = parse_model_uri(uri)
    if ref is None or ref.pinned:
        return uri
    return f"models:/{ref.name}/{resolve_version(client, ref)}"


def pin_tokenizer(client: MlflowClient, run_id: str, tokenizer: str | None) -> str | None:
    """The job's tokenizer as a fixed version: the one recorded on its run (a restarted or resumed job), else
    the alias resolved now and recorded."""
    if not tokenizer or not tokenizer.startswith("models:"):
        return tokenizer
    pinned = client.get_run(run_id).data.tags.get(TOKENIZER_TAG)
    if pinned is None:
        pinned = pin_model_uri(client, tokenizer)
        client.set_tag(run_id, TOKENIZER_TAG, pinned)
    return pinned


def _create_experiment(client: MlflowClient, name: str) -> str:
    try:
        return client.create_experiment(name, tags={provenance.EXPERIMENT_KIND_TAG: provenance.TRAINING_KIND})
    except mlflow.exceptions.MlflowException:  # created concurrently by another job
        return client.get_experiment_by_name(name).experiment_id


def log_spec(client: MlflowClient, run_id: str, spec: JobSpec) -> None:
    """The spec on a new run: its chosen and core fields as params (`run_params`) and whole as `spec/spec.yaml`,
    both redacted (storage secrets as '***'): anyone who can read the run can read its params and artifacts."""
    log_params(client, run_id, run_params(spec))
    client.log_text(run_id, spec_yaml(spec), SPEC_ARTIFACT)


def spec_yaml(spec: JobSpec) -> str:
    """The redacted spec as YAML (the validated form: defaults filled in, paths absolute)."""
    return yaml.safe_dump(redacted(spec), sort_keys=False)


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log the flattened spec (MLflow takes at most 100 params per call and bounded values)."""
    items = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in the model-training view (for an http(s) tracking server; else the
    run URI)."""
    if tracking_uri.startswith(("http://", "https://")):
        return provenance.with_training_view(f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
    return f"runs:/{run_id}"


def ui_url(tracking_uri: str) -> str | None:
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else None


def to_floats(values: list[Any]) -> list[float]:
    """Python floats of numbers and 0-d tensors, with one device-to-host copy per device (reading
    tensors one by one would wait for the device once each)."""
    out: list[Any] = list(values)
    by_device: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        if hasattr(v, "detach"):
            by_device.setdefault(v.device, []).append(i)
    if by_device:
        import torch  # only when tensors were logged: the service imports this module without torch

        for positions in by_device.values():
            stacked = torch.stack([values[i].detach().reshape(()).double() for i in positions])
            for i, f in zip(positions, stacked.tolist(), strict=True):
                out[i] = f
    return [float(v) for v in out]


class RunLogger:
    """Rank 0's handle on the job's run: metrics are buffered and sent in batches (one HTTP call per
    `flush_every` seconds instead of one per step), images and figures go straight out.

    A restarted worker resumes from its last checkpoint and replays the steps after it, some of which had
    already reached the run: each flush records its highest step on the run, and a new logger drops metrics
    and images at or below it, so every step is logged once. A rank 0 of the replaced worker group may still be
    running for a moment (Ray stops it at its own pace): each logger claims the run (`LOGGER_TAG`) when it
    starts and checks the claim before it flushes, so a superseded one drops its buffer instead of logging
    steps the new group logs again.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: float = 5.0, system_metrics: bool = False):
        self.tracking_uri, self.run_id, self.flush_every = tracking_uri, run_id, flush_every
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # the registry is the same server
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        logged = self.client.get_run(run_id).data.tags.get(LOGGED_STEP_TAG)
        self.logged_through = int(logged) if logged and logged.lstrip("-").isdigit() else -1
        self.replayed_through = self.logged_through  # steps a restart replays; fixed for this logger's life
        self.claim = uuid.uuid4().hex
        self.superseded = False
        self.client.set_tag(run_id, LOGGER_TAG, self.claim)
        self.monitor = start_system_metrics(tracking_uri, run_id) if system_metrics else None

    def close(self) -> None:
        """Send what is buffered and stop the system-metrics thread (its last sample included)."""
        self.flush()
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            monitor.finish()
            try:  # the samples of the last, unfinished interval (all of them in a job shorter than one)
                pending = monitor.aggregate_metrics()
                if pending:
                    monitor.publish_metrics(pending)
                    monitor.mlflow_logger.flush()
            except Exception as e:  # noqa: BLE001 - system metrics must never fail a job
                print(f"vqtrain note: last system metrics not logged ({e})", flush=True)

    def log_metrics(self, metrics: dict[str, Any], step: int, replay: bool = True) -> None:
        """Buffer metrics at `step`; `replay=False` for a record that is new even at a replayed step
        (`train/resumed_from`). Values may be 0-d device tensors: they are read back together at the
        flush, so a training step never waits for the GPU to log."""
        if replay and step <= self.replayed_through:  # replayed after a restart: already in the run
            return
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._buffer.append(Metric(_metric_key(key), value, now_ms, int(step)))
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        if not buffer or self._superseded():
            self._last_flush = time.monotonic()
            return
        values = to_floats([m.value for m in buffer])
        buffer = [Metric(m.key, v, m.timestamp, m.step) for m, v in zip(buffer, values, strict=True)]
        for i in range(0, len(buffer), 1000):
            self.client.log_batch(self.run_id, metrics=buffer[i : i + 1000])
        self._last_flush = time.monotonic()
        if buffer:
            self._mark_logged(max(m.step for m in buffer))

    def _superseded(self) -> bool:
        """True once a newer logger has claimed the run (checked at each flush: one request per flush)."""
        if not self.superseded:
            self.superseded = self.client.get_run(self.run_id).data.tags.get(LOGGER_TAG) != self.claim
        return self.superseded

    def _mark_logged(self, step: int) -> None:
        if step > self.logged_through:
            self.logged_through = step
            self.client.set_tag(self.run_id, LOGGED_STEP_TAG, str(step))

    def log_image(self, image: Any, key: str, step: int) -> None:
        """An image with a step (MLflow's image-per-step view). Best effort: a picture never fails a job."""
        if step <= self.replayed_through or self.superseded:
            return
        try:
            self.client.log_image(self.run_id, image, key=key, step=int(step))
        except Exception as e:  # noqa: BLE001
            print(f"vqtrain note: picture {key} at step {step} not logged ({type(e).__name__}: {e})", flush=True)

    def _log_model_metrics(self, model_id: str, metrics: dict[str, Any], step: int) -> None:
        """The final evaluation attached to the logged model (MLflow 3 LoggedModel metrics; MLflow records them on
        the run too, so the run's history has the last step's values twice). Best effort: never fails a job."""
        charted = {k: v for k, v in split_constants(metrics)[0].items() if v is not None}
        if not charted:
            return
        try:
            now_ms = int(time.time() * 1000)
            values = to_floats(list(charted.values()))
            self.client.log_batch(self.run_id, metrics=[
                Metric(_metric_key(k), v, now_ms, int(step), model_id=model_id)
                for k, v in zip(charted, values, strict=True)
            ])
        except Exception as e:  # noqa: BLE001
            print(f"vqtrain note: the model's metrics were not attached ({e})", flush=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_model(
        self, model_dir: str | Path, artifact_key: str, registered_name: str | None, alias: str | None, *,
        step: int = 0, card: dict[str, str] | None = None, signature: Any = None, input_example: Any = None,
        metrics: dict[str, float] | None = None,
    ) -> str:
        """Log `model_dir` (config.json + weights) as a pyfunc model at `step`, with its final `metrics` attached
        (MLflow 3's LoggedModel), register it and set the alias.

        The python model is given as code (`jobs/mlflow_model.py`), so nothing is pickled; the weights and
        config sit under `<model>/artifacts/<artifact_key>/`, which is what `vqmodels.load_tokenizer` and
        `vqtrain pull` look for. Requirements are pinned to the versions that trained it. Returns the URI to hand
        to users: `models:/name@alias` when an alias is set, `models:/name/version` otherwise, the logged
        model's own URI when nothing is registered.

        Idempotent per run: a restarted worker that already registered this run's model reuses that
        version instead of registering a second one. `card`: model-card tags for the version
        (`jobs.model_card`), from which its description is written.
        """
        self.flush()
        tags = self.client.get_run(self.run_id).data.tags
        version = tags.get(MODEL_VERSION_TAG)
        if version is None or registered_name is None:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)  # registered_model_name goes through the registry URI
            origin = {k: tags[k] for k in ("mlflow.user", "mlflow.source.name", "mlflow.source.type") if k in tags}
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pyfunc.log_model(
                    name=artifact_key,
                    python_model=str(PYFUNC_CODE),
                    artifacts={artifact_key: str(model_dir)},
                    registered_model_name=registered_name,
                    pip_requirements=pinned_requirements(),
                    signature=signature,
                    input_example=input_example,
                    code_paths=[str(Path(importlib.import_module(m).__file__).parent) for m in ("vqmodels", "vqbase")],
                    step=int(step),
                    tags=origin,  # else the model says "Logged from default_worker.py" (Ray's process)
                )
            if registered_name is not None:  # recorded first: a restarted group must not register it again
                version = str(info.registered_model_version)
                self.set_tag(MODEL_VERSION_TAG, version)
            # leaving `start_run` marked the run FINISHED: it is not (the driver ends it), and the system-metrics
            # thread stops logging once its run is no longer RUNNING
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_model_metrics(info.model_id, metrics or {}, step)
            if registered_name is None:
                self.set_tag(MODEL_URI_TAG, info.model_uri)
                return info.model_uri
        if alias:
            self.client.set_registered_model_alias(registered_name, alias, version)
        if card:
            from jobs.model_card import describe_registered_model, update_card

            update_card(self.client, registered_name, version, card)
            try:
                describe_registered_model(self.client, registered_name, card)
            except Exception as e:  # noqa: BLE001 - the registered model's page text must not fail a job
                print(f"vqtrain note: the registered model's description was not written ({e})", flush=True)
        uri = f"models:/{registered_name}@{alias}" if alias else f"models:/{registered_name}/{version}"
        self.set_tag(MODEL_URI_TAG, uri)
        return uri


SYSTEM_METRICS_INTERVAL_S = 10.0


def start_system_metrics(tracking_uri: str, run_id: str) -> Any | None:
    """MLflow's system-metrics thread for this process's node (`system/cpu_utilization_percentage`, memory,
    disk, network; GPU utilisation and memory with the `gpu` extra's nvidia-ml-py), continuing the run's step
    count after a restart. None, with a line saying why, where it cannot start (psutil missing)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=True,
                                       tracking_uri=tracking_uri)
        monitor.start()
    except ImportError as e:
        print(f"vqtrain note: no system metrics ({e}); install psutil (the train extra has it)", flush=True)
        return None
    except Exception as e:  # noqa: BLE001 - e.g. psutil without /proc/net/dev in a container: never fail a job
        print(f"vqtrain note: no system metrics ({type(e).__name__}: {e})", flush=True)
        return None
    return monitor


def pinned_requirements() -> list[str]:
    """The packages the pyfunc needs, at the versions that trained the model (torch without its local build
    suffix such as '+cpu', which pip cannot resolve from PyPI)."""
    from importlib.metadata import version

    return [f"torch=={version('torch').split('+')[0]}", f"numpy=={version('numpy')}", f"mlflow=={version('mlflow')}"]


def _metric_key(key: str) -> str:
    """MLflow keys allow [A-Za-z0-9_-. /]; replace anything else (e.g. ':' or '@')."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
