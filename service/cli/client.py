"""How the CLI reaches the HTTP API: `$VQTRAIN_URL` (token `$VQTRAIN_TOKEN`), else the local `vqtrain serve`
recorded in `$VQTRAIN_HOME/service.json` (token in `$VQTRAIN_HOME/token`); and one request to it, with
HTTP errors turned into a message and an exit code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import typer

from vqbase.local import http_ok, vqtrain_home

TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_PAUSE = 2.0  # seconds between retries of a request with `retry_for`


@dataclass
class Api:
    url: str
    token: str | None


def find_api() -> Api | None:
    """The configured API, or a running local `vqtrain serve`; None if neither."""
    token = os.environ.get("VQTRAIN_TOKEN")
    if os.environ.get("VQTRAIN_URL"):
        return Api(os.environ["VQTRAIN_URL"].rstrip("/"), token)
    home = vqtrain_home()
    try:
        url = json.loads((home / "service.json").read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    if not http_ok(f"{url}/healthz"):
        return None
    if token is None and (home / "token").exists():
        token = (home / "token").read_text().strip()
    return Api(url, token)


def require_api() -> Api:
    """`find_api()`, or exit 2 saying how to get one."""
    api = find_api()
    if api is None:
        typer.echo(
            "error: no vqtrain service: set VQTRAIN_URL (and VQTRAIN_TOKEN) or run `vqtrain serve`", err=True
        )
        raise typer.Exit(2)
    return api


def request(method: str, path: str, api: Api | None = None, retry_for: float = 0.0, **kwargs: Any) -> Any:
    """One API call; HTTP errors become a clear message and exit code 1 (2 for an invalid spec).

    `retry_for` seconds: keep retrying while the service is unreachable or answers 502/503/504 (a restarting
    service or Ray head must not end a `--follow` that has been watching a job for hours).
    """
    api = api or require_api()
    headers = ({"Authorization": f"Bearer {api.token}"} if api.token else {}) | kwargs.pop("headers", {})
    deadline = time.monotonic() + retry_for
    while True:
        try:
            r = httpx.request(method, api.url + path, headers=headers, timeout=60, **kwargs)
        except httpx.TransportError as e:
            if time.monotonic() < deadline:
                time.sleep(RETRY_PAUSE)
                continue
            typer.echo(f"error: cannot reach {api.url}: {e}", err=True)
            raise typer.Exit(1) from None
        if r.status_code in (502, 503, 504) and time.monotonic() < deadline:
            time.sleep(RETRY_PAUSE)
            continue
        break
    try:
        body = r.json()
    except ValueError:
        body = {"detail": r.text}
    if r.status_code == 422 and isinstance(body, dict) and isinstance(body.get("detail"), list):
        typer.echo("invalid job spec:", err=True)
        for err in body["detail"]:
            loc = err["loc"] if isinstance(err["loc"], str) else ".".join(map(str, err["loc"]))
            typer.echo(f"  {loc or '<spec>'}: {err['msg']}", err=True)
        raise typer.Exit(2)
    if r.status_code >= 400:
        detail = body.get("detail", body) if isinstance(body, dict) else body
        typer.echo(f"error: {r.status_code} {detail}", err=True)
        raise typer.Exit(1)
    return body
