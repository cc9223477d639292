"""The `vqtrain` command line. Each command group lives in its own module; this file only assembles them.

The CLI imports the job spec and the data tools, never torch or `vqmodels`: training runs in
a separate process (`python -m jobs.run`) or on Ray, so the CLI stays light and starts fast.
"""

from __future__ import annotations

import typer

from service import cli_eval, cli_jobs, cli_shards

app = typer.Typer(help="vqtrain: train discrete image tokenizers on Ray.", no_args_is_help=True)
app.add_typer(cli_shards.app, name="shards", help="Make, check and inspect WebDataset shards.")
cli_jobs.register(app)
cli_eval.register(app)


def main() -> None:
    """Entry point of the `vqtrain` console script."""
    app()


if __name__ == "__main__":
    main()
