"""Job commands: `vqtrain run`, `spec`, `serve`, `pull` here; `submit`, `status`, `logs`, `cancel`,
`models` (which talk to the HTTP API) in `service.cli_api`.

`vqtrain run` trains in a child process (`python -m jobs.run`), so this module never imports torch.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from jobs.spec import JobSpec, SpecError, load_spec
from service import cli_api, embedded
from service.cli_progress import ProgressBar
from service.ray_client import PROGRESS_PREFIX, RESULT_PREFIX

spec_app = typer.Typer(no_args_is_help=True, help="Print the spec's JSON Schema or check spec files.")


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def _print_spec_error(e: SpecError, source: str) -> None:
    typer.echo(f"{source}: invalid job spec", err=True)
    for err in e.errors:
        typer.echo(f"  {err['loc'] or '<spec>'}: {err['msg']}", err=True)


# ------------------------------------------------------------------------------------------- spec


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the job spec's JSON Schema."""
    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


@spec_app.command("check")
def spec_check(files: Annotated[list[Path], typer.Argument(help="Spec files (YAML or JSON).")]) -> None:
    """Validate spec files; exit 1 if any is invalid (each error names its field)."""
    bad = 0
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as e:
            _print_spec_error(e, str(path))
            bad += 1
        else:
            typer.echo(f"{path}: ok ({spec.kind} {spec.name!r})")
    if bad:
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------------- run


def tracking_uri() -> str:
    """The configured MLflow URI, else the embedded local server (started on first use)."""
    uri = os.environ.get("VQTRAIN_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or embedded.ensure_mlflow()


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
        _print_spec_error(e, str(spec_file))
        raise typer.Exit(2) from None
    address = os.environ.get("VQTRAIN_RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):  # a Jobs API address: for the service, not ray.init
        raise _fail(
            f"VQTRAIN_RAY_ADDRESS={address} is a Ray Jobs API address; `vqtrain run` drives the job from this "
            "process and needs a cluster address (ray://head:10001) or none (a local Ray). To run on that "
            f"cluster: `VQTRAIN_RAY_ADDRESS={address} vqtrain serve`, then `vqtrain submit {spec_file}`"
        )
    uri = tracking_uri()
    env = embedded.without_service_secrets({**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"})
    log_dir = embedded.vqtrain_home() / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    typer.echo(f"MLflow: {uri}\nlog: {log_path}")
    cmd = [sys.executable, "-m", "jobs.run", str(spec_file)] + (["--job-id", job_id] if job_id else [])
    code, result = _run_child(cmd, env, log_path, spec.name, verbose)
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        typer.echo("\n".join(tail), err=True)
        raise _fail(f"job {spec.name!r} failed (exit {code}); full log: {log_path}", 1)
    _print_result(result)


def _run_child(cmd: list[str], env: dict, log_path: Path, name: str, verbose: bool) -> tuple[int, dict]:
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
                if line.startswith(PROGRESS_PREFIX):
                    item = json.loads(line[len(PROGRESS_PREFIX) :])
                    bar.update(
                        item.get("step"), item.get("total"), item.get("metrics", {}), item.get("images_per_s")
                    )
                elif line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX) :])
                elif verbose or line.startswith(("vqtrain:", "vqtrain note:")):
                    bar.write(line.rstrip("\n"))
        return proc.wait(), result
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        raise typer.Exit(130) from None
    finally:
        bar.close()


_HEADLINE = ("psnr", "ssim", "lpips", "rfid", "usage", "perplexity", "dead_codes", "bits_per_image", "fid",
             "inception_score", "class_acc", "nll", "unigram_entropy", "nll_vs_unigram", "images")


def _print_result(result: dict) -> None:
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
            typer.echo(f"  {key:<22} {'not computed (no weights named in evaluation:)' if v is None else f'{v:.6g}'}")


# ------------------------------------------------------------------------------------------- pull


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
        raise _fail(str(e)) from None
    except Exception as e:  # MLflow: unknown model/alias, unreachable server
        raise _fail(f"cannot download {ref!r} from {uri}: {e}", 1) from None
    typer.echo(f"{registry.model_uri(ref)} -> {dest}")


def _pull_tracking_uri() -> str:
    configured = os.environ.get("VQTRAIN_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    api = cli_api.find_api()
    if api is not None:  # the service knows its MLflow
        return cli_api.request("GET", "/v1/models", api=api)["tracking_uri"]
    return embedded.ensure_mlflow()


# ------------------------------------------------------------------------------------------ serve


def local_token(home: Path) -> str:
    """The embedded service's admin token (created once, 0600, in VQTRAIN_HOME/token)."""
    path = home / "token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def serve(
    host: Annotated[str, typer.Option(help="Interface for the API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the API.")] = 8000,
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs of the local Ray head (default: all).")] = None,
) -> None:
    """Run the service: local Ray head, local MLflow server, SQLite store, API (unless configured)."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings, TokenEntry, hash_token

    settings = Settings()
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings.home = home
    typer.echo("starting Ray and MLflow (first start takes a while)…")
    settings.ray_address = embedded.ensure_ray(settings.ray_address, home, num_cpus)
    settings.mlflow_uri = settings.mlflow_uri or embedded.ensure_mlflow(home)
    token_note = "tokens from VQTRAIN_TOKENS"
    if not settings.tokens:
        settings.tokens = [TokenEntry(name="local-admin", sha256=hash_token(local_token(home)))]
        token_note = f"token in {home / 'token'}"
    if not settings.allowed_roots:
        settings.allowed_roots = [str(Path.cwd().resolve()), str(home)]
    url = f"http://{host}:{port}"
    embedded.write_private(home / "service.json", json.dumps({"url": url, "pid": os.getpid()}))
    typer.echo(f"vqtrain API:   {url}  (docs {url}/docs; {token_note})")
    typer.echo(f"MLflow UI:     {settings.mlflow_uri}")
    typer.echo(f"Ray dashboard: {settings.ray_address}")
    typer.echo(f"local data roots: {', '.join(settings.allowed_roots)}")
    # uvicorn shuts down on SIGTERM, then re-raises it: with the default handler the process would die before
    # the `finally` below and leave a stale service.json that points clients at nothing
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    finally:
        (home / "service.json").unlink(missing_ok=True)


def register(app: typer.Typer) -> None:
    """Add the job commands to the top-level app."""
    app.command("run")(run)
    app.add_typer(spec_app, name="spec")
    app.command("serve")(serve)
    app.command("pull")(pull)
    cli_api.register(app)
