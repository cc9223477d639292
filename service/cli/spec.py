"""`vqtrain spec schema|check`: the job spec's JSON Schema, and validation of spec files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from jobs.spec import JobSpec, SpecError, load_spec
from service.cli.common import print_spec_error

app = typer.Typer(no_args_is_help=True, help="Print the spec's JSON Schema or check spec files.")


@app.command("schema")
def spec_schema() -> None:
    """Print the job spec's JSON Schema."""
    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


@app.command("check")
def spec_check(files: Annotated[list[Path], typer.Argument(help="Spec files (YAML or JSON).")]) -> None:
    """Validate spec files; exit 1 if any is invalid (each error names its field)."""
    bad = 0
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as e:
            print_spec_error(e, str(path))
            bad += 1
        else:
            typer.echo(f"{path}: ok ({spec.kind} {spec.name!r})")
    if bad:
        raise typer.Exit(1)
