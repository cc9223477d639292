"""`vqtrain shards make|check`: build WebDataset shards from an image folder or tar, and verify shard sets.

Imports only torch-free modules (`jobs.data.shards`, `jobs.data.check`): the CLI must start fast.
Object-storage endpoint and credentials come from `--endpoint-url` or the AWS_* environment.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)

EndpointOpt = Annotated[
    str | None,
    typer.Option("--endpoint-url", envvar="AWS_ENDPOINT_URL", help="S3 endpoint (default: AWS_ENDPOINT_URL)."),
]


def _storage_options(endpoint_url: str | None) -> dict[str, Any] | None:
    return {"endpoint_url": endpoint_url} if endpoint_url else None


@app.command("make")
def make(
    src: Annotated[str, typer.Argument(help="Image folder or tar of one, laid out <class>/<image>.")],
    dest: Annotated[str, typer.Argument(help="Local folder or s3://bucket/prefix for the shards.")],
    per_shard: Annotated[int, typer.Option("--per-shard", min=1, help="Samples per shard.")] = 1000,
    resize: Annotated[int | None, typer.Option("--resize", min=1, help="Resize + centre crop to S×S.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Shard name prefix (default: from SRC).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample order shuffle.")] = 0,
    shuffle: Annotated[bool, typer.Option("--shuffle/--no-shuffle", help="Mix classes across shards.")] = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Skip images PIL cannot parse.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace shards already at DEST.")] = False,
    endpoint_url: EndpointOpt = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Write DEST/<name>-000000.tar … and DEST/manifest.json from SRC."""
    from jobs.data.shards import make_shards

    try:
        res = make_shards(
            src, dest, per_shard=per_shard, name=name, resize=resize, shuffle=shuffle, seed=seed,
            verify=verify, storage_options=_storage_options(endpoint_url), progress=progress,
            overwrite=overwrite,
        )
    except (ValueError, FileNotFoundError) as exn:
        typer.echo(f"error: {exn}", err=True)
        raise typer.Exit(2) from exn
    m = res.manifest
    typer.echo(f"wrote {len(m.shards)} shards, {m.num_samples} samples, {len(m.class_names)} classes")
    typer.echo(f"manifest: {res.manifest_url}")
    if res.ignored:
        typer.echo(f"ignored {res.ignored} non-image files")
    for f, err in res.skipped:
        typer.echo(f"skipped unreadable image {f}: {err}", err=True)


@app.command("check")
def check(
    urls: Annotated[list[str], typer.Argument(help="Shard patterns ({000000..000009}), prefixes or manifest.json.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    endpoint_url: EndpointOpt = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Read every sample; exit 1 when a shard is unreadable or disagrees with its manifest."""
    from jobs.data.check import check_shards

    try:
        rep = check_shards(urls, _storage_options(endpoint_url), progress=progress and not as_json)
    except ValueError as exn:
        typer.echo(f"error: {exn}", err=True)
        raise typer.Exit(2) from exn
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        _print_report(rep)
    if not rep.ok:
        raise typer.Exit(1)


def _print_report(rep) -> None:
    w = max([len(s.url) for s in rep.shards] + [5])
    typer.echo(f"{'shard':<{w}}  {'samples':>8}  {'bad':>5}  status")
    for s in rep.shards:
        status = "; ".join(s.problems) or "ok"
        typer.echo(f"{s.url:<{w}}  {s.samples:>8}  {len(s.decode_failures):>5}  {status}")
    typer.echo(f"{'total':<{w}}  {rep.samples:>8}  {rep.decode_failures:>5}")
    typer.echo("samples per class:")
    for c, n in rep.classes.items():
        label = rep.class_names[int(c)] if rep.class_names and 0 <= int(c) < len(rep.class_names) else ""
        typer.echo(f"  {c:>4} {label:<16} {n}")
    for s in rep.shards:
        for f in s.decode_failures[:20]:
            typer.echo(f"decode failure {s.url} {f['key']}: {f['error']}", err=True)
    if rep.unreadable:
        typer.echo(f"{len(rep.unreadable)} unreadable shard(s): " + ", ".join(rep.unreadable), err=True)
    sys.stdout.flush()
