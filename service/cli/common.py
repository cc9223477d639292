"""What the command modules share: error exits, spec errors as the CLI prints them, and the job child process
that `vqtrain run`, `eval` and `sample` start on this machine (its environment, its log file under
`$VQTRAIN_HOME/runs`, its `VQTRAIN_PROGRESS` / `VQTRAIN_RESULT` lines turned into a progress bar and a result).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import typer

from jobs.spec import SpecError
from service.cli.progress import ProgressBar
from vqbase.local import vqtrain_home, without_service_secrets
from vqbase.protocol import parse_line


def fail(msg: str, code: int = 2) -> typer.Exit:
    """Print `error: msg` and return the exit to raise (2: the command line or spec was wrong)."""
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def print_spec_error(e: SpecError, source: str) -> None:
    typer.echo(f"{source}: invalid job spec", err=True)
    for err in e.errors:
        typer.echo(f"  {err['loc'] or '<spec>'}: {err['msg']}", err=True)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a job child, without the service's API tokens, unbuffered."""
    return without_service_secrets({**os.environ, "PYTHONUNBUFFERED": "1", **extra})


def new_log(prefix: str) -> Path:
    """A fresh log file path, `$VQTRAIN_HOME/runs/<prefix>-<time>.log` (the folder is created)."""
    log_dir = vqtrain_home() / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def print_tail(log_path: Path, lines: int) -> None:
    """The last lines of a failed child's log, on stderr."""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    typer.echo("\n".join(tail), err=True)


def run_child(cmd: list[str], env: dict, log_path: Path, name: str, verbose: bool) -> tuple[int, dict]:
    """Run a job child, its output into `log_path` and its progress into a bar; (exit code, its result line)."""
    result: dict = {}
    bar = ProgressBar(name)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1
    )
    try:
        with open(log_path, "w") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                parsed = parse_line(line)
                if parsed is not None and parsed[0] == "progress":
                    item = parsed[1]
                    bar.update(
                        item.get("step"), item.get("total"), item.get("metrics", {}), item.get("images_per_s")
                    )
                elif parsed is not None:
                    result = parsed[1]
                elif verbose or line.startswith(("vqtrain:", "vqtrain note:")):
                    bar.write(line.rstrip("\n"))
        return proc.wait(), result
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        raise typer.Exit(130) from None
    finally:
        bar.close()
