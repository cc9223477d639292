"""`vqtrain serve`: the service on this machine: a local Ray head and MLflow server (unless configured), the
SQLite job store and the HTTP API, with a local admin token when no tokens are configured."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from service import embedded
from vqbase.local import ensure_mlflow, write_private


def local_token(home: Path) -> str:
    """The embedded service's admin token (created once, 0600, in VQTRAIN_HOME/token)."""
    path = home / "token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def serve(
    host: Annotated[str, typer.Option(help="Interface for the API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the API.")] = 8000,
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs of the local Ray head (default: all).")] = None,
) -> None:
    """Run the service: local Ray head, local MLflow server, SQLite store, API (unless configured)."""
    import uvicorn

    from service.api.app import create_app
    from service.settings import Settings, TokenEntry, hash_token

    settings = Settings()
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings.home = home
    typer.echo("starting Ray and MLflow (first start takes a while)…")
    settings.ray_address = embedded.ensure_ray(settings.ray_address, home, num_cpus)
    # Settings read VQTRAIN_MLFLOW_URI / MLFLOW_TRACKING_URI already; else the embedded server in the settings' home
    settings.mlflow_uri = settings.mlflow_uri or ensure_mlflow(home)
    token_note = "tokens from VQTRAIN_TOKENS"
    if not settings.tokens:
        settings.tokens = [TokenEntry(name="local-admin", sha256=hash_token(local_token(home)))]
        token_note = f"token in {home / 'token'}"
    if not settings.allowed_roots:
        settings.allowed_roots = [str(Path.cwd().resolve()), str(home)]
    url = f"http://{host}:{port}"
    write_private(home / "service.json", json.dumps({"url": url, "pid": os.getpid()}))
    typer.echo(f"vqtrain API:   {url}  (docs {url}/docs; {token_note})")
    typer.echo(f"MLflow UI:     {settings.mlflow_uri}")
    typer.echo(f"Ray dashboard: {settings.ray_address}")
    typer.echo(f"local data roots: {', '.join(settings.allowed_roots)}")
    # uvicorn shuts down on SIGTERM, then re-raises it: with the default handler the process would die before
    # the `finally` below and leave a stale service.json that points clients at nothing
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        (home / "service.json").unlink(missing_ok=True)
