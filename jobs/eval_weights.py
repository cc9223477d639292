"""Feature-network weights for evaluation: fetched once per node into a cache, checked, never from a hub.

A location is a local path (read in place), `s3://` / `gs://` / `http(s)://` in the user's own store, or an
MLflow artifact URI (`models:/...`, `runs:/...`, `mlflow-artifacts:/...`). Remote files land in
`<VQTRAIN_HOME>/weights/<hash of the location>/<file name>`, written atomically under a lock so the
workers of one node fetch a file once. The cache key is the location with its S3 endpoint or MLflow server;
an MLflow alias without a `sha256` is fetched again each time (aliases move). With a `sha256`, the file
(local or cached) must match it; a cached copy that no longer matches is fetched again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vqbase.local import vqtrain_home
from vqbase.uris import MLFLOW_SCHEMES, url_scheme

CHUNK = 1 << 20


def cache_root() -> Path:
    root = vqtrain_home() / "weights"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, storage_options: dict[str, Any] | None, tracking_uri: str | None) -> None:
    scheme = url_scheme(url) or ""
    if scheme in MLFLOW_SCHEMES:
        from vqbase.fetch import fetch_model_dir  # models:/ resolved against tracking_uri's registry

        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            got = Path(fetch_model_dir(url, tmp, tracking_uri))
            if got.is_dir():
                files = [p for p in got.rglob("*") if p.is_file()]
                if len(files) != 1:
                    raise ValueError(f"{url} is a folder of {len(files)} files; name the weights file itself")
                got = files[0]
            shutil.move(str(got), dest)
        return
    from jobs.data.storage import open_url

    with open_url(url, "rb", storage_options) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)


def fetch(url: str, field: str, sha256: str | None = None, storage_options: dict[str, Any] | None = None,
          tracking_uri: str | None = None) -> Path:
    """A local file holding the weights at `url` (see the module docstring); errors name `field`."""
    scheme = url_scheme(url) or ""
    if scheme in ("", "file"):
        path = Path(url[len("file://"):] if url.lower().startswith("file://") else url).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{field}: weights file {str(path)!r} does not exist (nothing is downloaded)")
        if sha256 and sha256_of(path) != sha256:
            raise ValueError(f"{field}: {str(path)!r} does not match its sha256 {sha256} (a different or damaged file)")
        return path
    name = Path(url.rstrip("/").rsplit("/", 1)[-1] or "weights").name or "weights"
    # the same URL on another endpoint or MLflow server is another file: both are part of the cache key
    from jobs.data.storage import fs_options

    endpoint = fs_options(url, storage_options).get("endpoint_url", "") if scheme in ("s3", "s3a") else ""
    where = (tracking_uri or "") if scheme in MLFLOW_SCHEMES else ""
    folder = cache_root() / hashlib.sha256(f"{url}\n{endpoint}\n{where}".encode()).hexdigest()[:24]
    # an alias (models:/name@alias/...) may move: without a digest to check, such a copy is fetched again
    movable = scheme == "models" and "@" in url.split("/", 2)[1] and not sha256
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / name
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per node; the others wait and find the file
        if dest.is_file() and not movable and (not sha256 or sha256_of(dest) == sha256):
            return dest
        part = folder / f".{name}.part"
        try:
            _download(url, part, storage_options, tracking_uri)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is reported against the field
            part.unlink(missing_ok=True)
            raise OSError(f"{field}: cannot fetch {url}: {e}") from e
        if sha256 and (got := sha256_of(part)) != sha256:
            part.unlink(missing_ok=True)
            raise ValueError(f"{field}: {url} has sha256 {got}, not the {sha256} the spec names")
        os.replace(part, dest)
    return dest
