"""CLI commands that talk to the HTTP API: `submit`, `status`, `logs`, `cancel`, `models`.

The API is `$VQTRAIN_URL` (token `$VQTRAIN_TOKEN`), else the local `vqtrain serve` recorded in
`$VQTRAIN_HOME/service.json` (token in `$VQTRAIN_HOME/token`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from jobs.spec import SpecError, absolute_paths, load_spec
from service import embedded
from service.cli_progress import ProgressBar

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
    home = embedded.vqtrain_home()
    try:
        url = json.loads((home / "service.json").read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    if not embedded.http_ok(f"{url}/healthz"):
        return None
    if token is None and (home / "token").exists():
        token = (home / "token").read_text().strip()
    return Api(url, token)


def _api() -> Api:
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
    api = api or _api()
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


def submit(
    spec_file: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).", exists=True, dir_okay=False)],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show progress until the job ends.")] = False,
) -> None:
    """Submit a job to the service (relative paths in the spec are made absolute from the spec's folder)."""
    try:
        spec = absolute_paths(load_spec(spec_file), spec_file.resolve().parent)
    except SpecError as e:
        typer.echo(f"{spec_file}: invalid job spec", err=True)
        for err in e.errors:
            typer.echo(f"  {err['loc'] or '<spec>'}: {err['msg']}", err=True)
        raise typer.Exit(2) from None
    api = _api()
    created = request("POST", "/v1/jobs", api=api, json=spec.model_dump(mode="json"))
    typer.echo(f"{created['id']} {created['state']}")
    if follow:
        raise typer.Exit(follow_job(api, created["id"], spec.name))


def follow_job(api: Api, job_id: str, name: str, interval: float = 2.0) -> int:
    """Progress bar until the job ends; 0 if it succeeded."""
    bar = ProgressBar(name)
    try:
        while True:
            d = request("GET", f"/v1/jobs/{job_id}", api=api, retry_for=120)
            p = d["progress"]
            bar.update(p.get("step"), p.get("total"), d.get("metrics") or {}, d.get("images_per_s"))
            if d["state"] in TERMINAL:
                break
            time.sleep(interval)
    finally:
        bar.close()
    _print_detail(d, short=True)
    return 0 if d["state"] == "succeeded" else 1


def _print_detail(d: dict, short: bool = False) -> None:
    p = d["progress"]
    rows = [("job", d["id"]), ("name", d["name"]), ("kind", d["kind"]), ("state", d["state"])]
    if p.get("total"):
        rows.append(("progress", f"{p.get('step') or 0}/{p['total']}"))
    if d.get("eta_seconds") and d["state"] == "running":
        rows.append(("eta", f"{d['eta_seconds']:.0f}s"))
    for key in ("run_url", "model_uri", "output", "failure_reason"):
        if d.get(key):
            rows.append((key.replace("_", " "), str(d[key])))
    if not short:
        rows += [("created", d["created_at"]), ("started", d.get("started_at") or "-"),
                 ("ended", d.get("ended_at") or "-")]  # fmt: skip
        rows += [(k, f"{v:.4g}") for k, v in sorted((d.get("metrics") or {}).items())]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:>{width}}  {v}")


def status(
    job_id: Annotated[str | None, typer.Argument(help="A job id; without one, list jobs.")] = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """One job in detail, or the latest jobs."""
    if job_id:
        d = request("GET", f"/v1/jobs/{job_id}")
        if as_json:
            typer.echo(json.dumps(d, indent=2))
        else:
            _print_detail(d)
        return
    params = {"limit": limit, **({"state": state} if state else {}), **({"kind": kind} if kind else {})}
    page = request("GET", "/v1/jobs", params=params)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    typer.echo(f"{'ID':<20} {'NAME':<24} {'KIND':<9} {'STATE':<9} {'PROGRESS':>11}  CREATED")
    for j in page["items"]:
        p = j["progress"]
        prog = f"{p.get('step') or 0}/{p['total']}" if p.get("total") else "-"
        typer.echo(
            f"{j['id']:<20} {j['name'][:24]:<24} {j['kind']:<9} {j['state']:<9} {prog:>11}  {j['created_at']}"
        )
    typer.echo(f"({len(page['items'])} of {page['total']})")


def logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")
    ] = False,
    tail: Annotated[int, typer.Option(help="Lines to show first.")] = 200,
) -> None:
    """The job's log (its Ray driver output)."""
    api = _api()
    page = request("GET", f"/v1/jobs/{job_id}/logs", api=api, params={"tail": tail})
    for line in page["lines"]:
        typer.echo(line)
    offset = page["next_offset"]
    while follow and page["state"] not in TERMINAL:
        time.sleep(2)
        page = request("GET", f"/v1/jobs/{job_id}/logs", api=api, params={"offset": offset}, retry_for=120)
        for line in page["lines"]:
            typer.echo(line)
        offset = page["next_offset"]
        if page["state"] in TERMINAL:  # one last read: lines written just before the end
            page = request("GET", f"/v1/jobs/{job_id}/logs", api=api, params={"offset": offset})
            for line in page["lines"]:
                typer.echo(line)
            break


def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job (a queued one at once; a running one is stopped by Ray)."""
    d = request("POST", f"/v1/jobs/{job_id}/cancel")
    typer.echo(f"{d['id']} {d['state']}" + ("" if d["state"] in TERMINAL else " (stopping)"))


def models(
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Registered tokenizers and MaskGIT models: versions and aliases."""
    api = find_api()
    if api is not None:
        page = request("GET", "/v1/models", api=api, params={"name": name} if name else {})
    else:  # no service: ask MLflow directly
        from service import cli_jobs, registry

        uri = cli_jobs.tracking_uri()
        page = {"tracking_uri": uri, "models": registry.list_models(uri, name)}
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    typer.echo(f"MLflow: {page['tracking_uri']}")
    for m in page["models"]:
        aliases = ", ".join(f"@{a}->v{v}" for a, v in sorted(m["aliases"].items())) or "no aliases"
        typer.echo(f"{m['name']}  latest v{m['latest_version']}  ({aliases})")
        for v in m["versions"][:5]:
            typer.echo(
                f"    v{v['version']}  {v['status']}  run {v['run_id']}  {' '.join('@' + a for a in v['aliases'])}"
            )
    if not page["models"]:
        typer.echo("(no registered models)")


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("models")(models)
