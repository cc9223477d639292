"""Commands for jobs on the service (through its HTTP API): `submit`, `status`, `logs`, `cancel`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from jobs.spec import SpecError, absolute_paths, load_spec
from service.cli.client import TERMINAL, Api, request, require_api
from service.cli.common import print_spec_error
from service.cli.progress import ProgressBar


def submit(
    spec_file: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).", exists=True, dir_okay=False)],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show progress until the job ends.")] = False,
) -> None:
    """Submit a job to the service (relative paths in the spec are made absolute from the spec's folder)."""
    try:
        spec = absolute_paths(load_spec(spec_file), spec_file.resolve().parent)
    except SpecError as e:
        print_spec_error(e, str(spec_file))
        raise typer.Exit(2) from None
    api = require_api()
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
    api = require_api()
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
