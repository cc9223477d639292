"""Registered models: `vqtrain models` lists them (through the service, else from MLflow directly) and
`vqtrain pull` downloads one's directory so `vqmodels.load(DIR)` works. MLflow is imported lazily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from service.cli.client import find_api, request
from service.cli.common import fail
from vqbase.local import configured_tracking_uri, tracking_uri


def models(
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Registered tokenizers and MaskGIT models: versions and aliases."""
    api = find_api()
    if api is not None:
        page = request("GET", "/v1/models", api=api, params={"name": name} if name else {})
    else:  # no service: ask MLflow directly
        from service import registry

        uri = tracking_uri()
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


def pull(
    ref: Annotated[
        str, typer.Argument(help="NAME, NAME@ALIAS, NAME/VERSION or models:/… (default @latest).")
    ],
    out: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the tokenizer to.")],
    tracking: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow URI (default: configured).")
    ] = None,
) -> None:
    """Download a registered model's directory (config.json + weights) so `vqmodels.load(DIR)` works."""
    from service import registry

    uri = tracking or _pull_tracking_uri()
    try:
        dest = registry.download_model(ref, out, uri)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    except Exception as e:  # MLflow: unknown model/alias, unreachable server
        raise fail(f"cannot download {ref!r} from {uri}: {e}", 1) from None
    typer.echo(f"{registry.model_uri(ref)} -> {dest}")


def _pull_tracking_uri() -> str:
    """`vqbase.local.tracking_uri()`, except that with no MLflow configured a running service is asked for its
    own first: the models it registered live there, not in an embedded server this machine would start."""
    if configured_tracking_uri() is None:
        api = find_api()
        if api is not None:
            return request("GET", "/v1/models", api=api)["tracking_uri"]
    return tracking_uri()
