"""The `vqtrain` command line. Each command group lives in its own module; this file only assembles them:

- `run`: train here (`python -m jobs.run` in a child process); `serve`: the service on this machine;
- `submit`, `status`, `logs`, `cancel`: jobs on the service, through its HTTP API (`client`);
- `models`, `pull`: registered models; `eval`, `sample` (`evaluate`): judge or sample a registered model;
- `shards`: make and check WebDataset shards; `spec`: the spec's JSON Schema, and checking spec files.

The CLI imports the job spec and the data tools, never torch or `vqmodels`: training runs in
a separate process (`python -m jobs.run`) or on Ray, so the CLI stays light and starts fast.
"""

from __future__ import annotations

import typer

from service.cli import evaluate, models, run, serve, shards, spec, submit

app = typer.Typer(help="vqtrain: train discrete image tokenizers on Ray.", no_args_is_help=True)
app.add_typer(shards.app, name="shards", help="Make, check and inspect WebDataset shards.")
app.command("run")(run.run)
app.add_typer(spec.app, name="spec")
app.command("serve")(serve.serve)
app.command("pull")(models.pull)
app.command("submit")(submit.submit)
app.command("status")(submit.status)
app.command("logs")(submit.logs)
app.command("cancel")(submit.cancel)
app.command("models")(models.models)
app.command("eval")(evaluate.eval_command)
app.command("sample")(evaluate.sample_command)


def main() -> None:
    """Entry point of the `vqtrain` console script."""
    app()
