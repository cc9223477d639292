"""`vqtrain run`: train here, in a child process (`python -m jobs.run`) on a local Ray (unless
`$VQTRAIN_RAY_ADDRESS` / `$RAY_ADDRESS` names a cluster), tracked in the configured or embedded MLflow.
The child does the training, so this module never imports torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from jobs.spec import SpecError, load_spec
from service.cli.common import child_env, fail, new_log, print_spec_error, print_tail, run_child
from vqbase.local import tracking_uri
from vqbase.protocol import RAY_ADDRESS_ENV

_HEADLINE = ("psnr", "ssim", "lpips", "rfid", "usage", "perplexity", "dead_codes", "bits_per_image", "fid",
             "inception_score", "class_acc", "nll", "unigram_entropy", "nll_vs_unigram", "images")


def run(
    spec_file: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON).", exists=True, dir_okay=False)],
    job_id: Annotated[
        str | None, typer.Option("--job-id", help="Reuse an id to resume a stopped job.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray's and the workers' output.")
    ] = False,
) -> None:
    """Run a job here: local Ray (unless VQTRAIN_RAY_ADDRESS/RAY_ADDRESS), embedded MLflow (unless configured)."""
    try:
        spec = load_spec(spec_file)
    except SpecError as e:
        print_spec_error(e, str(spec_file))
        raise typer.Exit(2) from None
    address = os.environ.get(RAY_ADDRESS_ENV, "")
    if address.startswith(("http://", "https://")):  # a Jobs API address: for the service, not ray.init
        raise fail(
            f"{RAY_ADDRESS_ENV}={address} is a Ray Jobs API address; `vqtrain run` drives the job from this "
            "process and needs a cluster address (ray://head:10001) or none (a local Ray). To run on that "
            f"cluster: `{RAY_ADDRESS_ENV}={address} vqtrain serve`, then `vqtrain submit {spec_file}`"
        )
    uri = tracking_uri()
    env = child_env(MLFLOW_TRACKING_URI=uri)
    log_path = new_log(spec.name)
    typer.echo(f"MLflow: {uri}\nlog: {log_path}")
    cmd = [sys.executable, "-m", "jobs.run", str(spec_file)] + (["--job-id", job_id] if job_id else [])
    code, result = run_child(cmd, env, log_path, spec.name, verbose)
    if code != 0:
        print_tail(log_path, 15)
        raise fail(f"job {spec.name!r} failed (exit {code}); full log: {log_path}", 1)
    print_result(result, has_eval=spec.data.eval is not None)


def print_result(result: dict, has_eval: bool = True) -> None:
    """The run's links, its model and its final evaluation; a metric not computed says why (the job's judges'
    reasons, or that the spec names no eval split), so the user knows what to add."""
    if result.get("run_url"):
        typer.echo(f"MLflow run: {result['run_url']}")
    if result.get("ui_url"):
        typer.echo(f"MLflow UI:  {result['ui_url']}")
    if result.get("model_uri"):
        typer.echo(f"model:      {result['model_uri']}")
    if result.get("output"):
        typer.echo(f"output:     {result['output']}")
    metrics = result.get("metrics") or {}
    if metrics:
        typer.echo("final evaluation:")
        for key in [k for k in _HEADLINE if k in metrics]:
            v = metrics[key]
            if v is None:
                why = (result.get("not_computed") or {}).get(key) or ("" if has_eval else "the spec names no data.eval")
                shown = f"not computed ({why})" if why else "not computed"
            else:
                shown = f"{v:.6g}"
            typer.echo(f"  {key:<22} {shown}")
