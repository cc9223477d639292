"""How `vqmodels.load_tokenizer("models:/…")` reaches MLflow: the model library never imports MLflow; it asks
the fetcher registered under the `vqmodels.fetchers` entry point (this function, see pyproject.toml) for a
local directory, then reads the checkpoint there.

Registry references are resolved here with a client made for the given tracking URI (registry lookups go to
the same server), so nothing process-wide — `mlflow.set_registry_uri`, `$MLFLOW_REGISTRY_URI` — is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from vqbase.uris import split_model_uri

NO_PRESIGNED_DOWNLOADS = "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")  # MLflow 3's `models:/m-<id>` names a logged model


def fetch_model_dir(uri: str, dst: str, tracking_uri: str | None = None) -> str:
    """Download what `uri` names (`models:/name@alias`, `models:/name/3`, `models:/name`, with or without a
    path inside the model, `runs:/…`, any artifact URI MLflow reads) into `dst`; returns the local path. `tracking_uri` (default: MLflow's own
    configuration) also names the registry."""
    try:
        import mlflow.artifacts
        from mlflow import MlflowClient
    except ImportError as e:
        raise ImportError(f"{uri}: loading from MLflow needs the 'mlflow' package (pip install vqtrain[train])") from e
    tracking_uri = tracking_uri or None  # "" too means MLflow's own configuration
    ref, inside = split_model_uri(uri)
    if ref is not None and not _LOGGED_MODEL_ID.match(ref.name):  # `models:/m-<id>`: a logged model, no registry
        location = _version_location(MlflowClient(tracking_uri, registry_uri=tracking_uri), ref)
        uri = f"{location.rstrip('/')}/{inside}" if inside else location
    with _proxied_downloads():
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri)


def resolve_version(client: Any, ref: Any) -> str:
    """The version a reference names now: its number; its alias's version (`latest`, MLflow's reserved alias,
    and no alias at all: the newest). One rule for pinning a job's tokenizer and for downloads."""
    if ref.version is not None:
        return str(ref.version)
    if ref.alias is not None and ref.alias.lower() != "latest":
        return str(client.get_model_version_by_alias(ref.name, ref.alias).version)
    found = client.search_model_versions(f"name = '{ref.name}'")
    if not found:
        raise ValueError(f"models:/{ref.name}: the registered model has no versions")
    return str(max(int(v.version) for v in found))


def _version_location(client: Any, ref: Any) -> str:
    """Where a registered version's files live (its run's artifacts, or its MLflow 3 logged model's)."""
    location = client.get_model_version_download_uri(ref.name, resolve_version(client, ref))
    if location.startswith("models:/m-"):  # a logged model's id: ask the tracking server where it lives
        location = client.get_logged_model(location.removeprefix("models:/").split("/")[0]).artifact_location
    return location


@contextlib.contextmanager
def _proxied_downloads() -> Iterator[None]:
    """Download through the tracking server, not from presigned URLs of its artifact store: those name the
    store's address inside the cluster (http://minio:9000), which a laptop behind a port-forward cannot
    resolve. Only for this download, and only when the user has not chosen."""
    if NO_PRESIGNED_DOWNLOADS in os.environ:
        yield
        return
    os.environ[NO_PRESIGNED_DOWNLOADS] = "false"
    try:
        yield
    finally:
        os.environ.pop(NO_PRESIGNED_DOWNLOADS, None)
