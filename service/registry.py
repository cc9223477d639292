"""The MLflow Model Registry as the service and the CLI see it: list registered models, find a job's
run, and download a model's tokenizer directory (`vqtrain pull`). Imports mlflow lazily, never torch."""

from __future__ import annotations

import concurrent.futures
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from vqbase.uris import parse_ref

JOB_TAG = "vqtrain.job_id"  # set by jobs.tracking on every job's run
KIND_TAG = "vqtrain.kind"


# MLflow's client retries an unreachable server with backoff for minutes; the API must not wait that long,
# so its calls run on daemon threads and are waited for with a deadline. Daemon threads: a call still
# retrying must not hold up the service's (or a test run's) exit, as a thread pool's workers would.
MLFLOW_DEADLINE_S = 10.0


def submit(fn: Any, *args: Any) -> concurrent.futures.Future:
    """fn(*args) on a daemon thread; the returned future is not waited for (the dispatcher polls it)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the future
            future.set_exception(e)

    threading.Thread(target=run, name="vqtrain-mlflow", daemon=True).start()
    return future


def call_with_deadline(fn: Any, *args: Any, deadline: float | None = None) -> Any:
    """fn(*args), or TimeoutError if it takes longer than `deadline` (default `MLFLOW_DEADLINE_S`) seconds."""
    deadline = MLFLOW_DEADLINE_S if deadline is None else deadline
    try:
        return submit(fn, *args).result(timeout=deadline)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"no answer from MLflow within {deadline:.0f} s") from None


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """Where MLflow would keep a job's artifacts: the experiment's artifact location, or for a new experiment
    the Default one's (the server's default root), asked of whatever the tracking URI names (a server,
    Databricks, a database). None when MLflow does not answer in time: the job's driver checks again."""

    def lookup() -> str | None:
        client = _client(tracking_uri)
        exp = client.get_experiment_by_name(experiment) or client.get_experiment("0")
        return exp.artifact_location if exp is not None else None

    try:
        return call_with_deadline(lookup, deadline=5.0)
    except Exception:  # noqa: BLE001 - an unreachable MLflow must not block the submission
        return None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the model-training view of the MLflow UI (what the job itself reports)."""
    from jobs.tracking import run_url as job_run_url  # imports mlflow (lazily here, as this module does)

    return job_run_url(tracking_uri, experiment_id, run_id)


def model_url(tracking_uri: str, name: str, version: str | None = None) -> str | None:
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = f"{tracking_uri.rstrip('/')}/#/models/{name}"
    return f"{base}/versions/{version}?workflowType=machine_learning" if version else f"{base}?workflowType=machine_learning"


def list_models(tracking_uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Registered models with every version and alias (newest version first)."""
    client = _client(tracking_uri)
    flt = f"name = '{name}'" if name else None
    out = []
    for m in client.search_registered_models(filter_string=flt, max_results=1000):
        versions = client.search_model_versions(f"name = '{m.name}'", max_results=1000)
        by_version: dict[str, list[str]] = {}
        for alias, version in (m.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        items = sorted(
            (
                {
                    "version": str(v.version),
                    "run_id": v.run_id,
                    "status": v.status,
                    "created_at": v.creation_timestamp,
                    "aliases": sorted(by_version.get(str(v.version), [])),
                    "kind": (v.tags or {}).get(KIND_TAG) or (v.tags or {}).get("kind"),
                    "uri": f"models:/{m.name}/{v.version}",
                    "url": model_url(tracking_uri, m.name, str(v.version)),
                }
                for v in versions
            ),
            key=lambda d: int(d["version"]),
            reverse=True,
        )
        out.append(
            {
                "name": m.name,
                "description": m.description or None,
                "aliases": {a: str(v) for a, v in (m.aliases or {}).items()},
                "latest_version": items[0]["version"] if items else None,
                "versions": items,
                "url": model_url(tracking_uri, m.name),
            }
        )
    return sorted(out, key=lambda d: d["name"])


def find_job_run(tracking_uri: str, experiment: str, job_id: str) -> tuple[str, str] | None:
    """(run_id, run_url) of the run a job logs to, once it exists."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1
    )
    if not runs:
        return None
    run = runs[0]
    return run.info.run_id, run_url(tracking_uri, exp.experiment_id, run.info.run_id)


def end_cancelled_run(tracking_uri: str, experiment: str, job_id: str) -> str | None:
    """Mark a cancelled job's run KILLED: Ray ends the driver with a signal, so the run itself stays RUNNING
    (as a crash would leave it). Returns the run id, or None if the job never made one."""
    found = find_job_run(tracking_uri, experiment, job_id)
    if found is None:
        return None
    client = _client(tracking_uri)
    if client.get_run(found[0]).info.status == "RUNNING":
        client.set_terminated(found[0], status="KILLED")
    return found[0]


def model_uri(ref: str) -> str:
    """`name`, `name@alias`, `name/version` or a full `models:/…` URI → a `models:/` URI (default @latest)."""
    if ref.startswith("models:/"):
        return ref
    parsed = parse_ref(ref)
    if parsed is None:
        raise ValueError(f"{ref!r}: expected NAME, NAME@ALIAS or NAME/VERSION")
    return f"models:/{ref}" if parsed.alias or parsed.version is not None else f"models:/{ref}@latest"


def _artifact_dir(model_root: Path) -> Path:
    """The folder holding config.json + weights inside a downloaded pyfunc model."""
    mlmodel = model_root / "MLmodel"
    if mlmodel.is_file():
        meta = yaml.safe_load(mlmodel.read_text()) or {}
        artifacts = (meta.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
        for entry in artifacts.values():
            path = model_root / (entry.get("path") if isinstance(entry, dict) else str(entry))
            if (path / "config.json").is_file():
                return path
    found = sorted(p.parent for p in model_root.rglob("config.json"))
    if not found:
        raise FileNotFoundError(f"no config.json in the downloaded model at {model_root}")
    return found[0]


def download_model(ref: str, dest: Path, tracking_uri: str) -> Path:
    """Download a registered model and copy its tokenizer (or MaskGIT) directory to `dest`."""
    from vqbase.fetch import fetch_model_dir  # the registry of `tracking_uri`, nothing process-wide

    uri = model_uri(ref)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty")
    with tempfile.TemporaryDirectory(prefix="vqtrain-pull-") as tmp:
        local = Path(fetch_model_dir(uri, tmp, tracking_uri))
        src = _artifact_dir(local)
        shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest
