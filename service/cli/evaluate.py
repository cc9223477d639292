"""`vqtrain eval` and `vqtrain sample`: judge a registered model, or draw images from one.

Like `vqtrain run`, the work happens in a child process (`python -m jobs.run` on Ray, or
`python -m jobs.eval_job` / `python -m jobs.sample` here), so this module never imports torch. The same
evaluation is submittable through the API as a `kind: eval` spec (examples/eval-tokenizer.yaml).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from jobs.spec import SpecError, absolute_paths, parse_spec
from service import registry
from service.cli.common import child_env, fail, new_log, print_spec_error, print_tail, run_child
from vqbase.local import tracking_uri
from vqbase.protocol import SPEC_ENV, spec_env
from vqbase.uris import parse_model_uri

HEADLINE = ("rfid", "psnr", "ssim", "lpips", "fid", "inception_score", "class_acc", "classifier_fd", "nll",
            "unigram_entropy", "usage", "perplexity", "dead_codes", "bits_per_image", "images", "samples")


def _card_image_size(uri: str, mlflow_uri: str) -> int | None:
    """The image size the model card records (`vqtrain.card.image_size`), if any."""
    ref = parse_model_uri(uri)
    if ref is None:
        return None
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"  # a hint, not worth minutes of back-off
    try:
        from mlflow import MlflowClient

        client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
        mv = (client.get_model_version(ref.name, str(ref.version)) if ref.version is not None
              else client.get_model_version_by_alias(ref.name, ref.alias))
        size = (mv.tags or {}).get("vqtrain.card.image_size")
        return int(size) if size and size.isdigit() else None
    except Exception:  # noqa: BLE001 - no card: the caller's default stands
        return None
    finally:
        if retries is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries


def eval_command(
    target: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or NAME/VERSION; or `stats` (see SHARDS).")],
    shards: Annotated[str | None, typer.Argument(help="with `stats`: the shards to summarise.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Eval shards (pattern, dir, manifest.json, s3://).")] = None,
    num: Annotated[int | None, typer.Option("--num", min=10, help="Generator: samples for FID/IS; stats: images.")] = None,
    fid_weights: Annotated[str | None, typer.Option("--fid-weights", help="weights-inception-2015-12-05-6726825d.pth (path, s3://, http(s)://, models:/).")] = None,
    lpips_weights: Annotated[list[str] | None, typer.Option("--lpips-weights", help="Backbone and LPIPS linear weights (repeat, or one file with both).")] = None,
    classifier: Annotated[str | None, typer.Option("--classifier", help="TorchScript classifier for class consistency and FD in its features.")] = None,
    reference_stats: Annotated[str | None, typer.Option("--reference-stats", help="Generator FID against this .npz (`vqtrain eval stats`).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Default: the model card's, else 32.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Generator sampling steps.")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", help="Generator classifier-free guidance.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray workers (ignored with --local).")] = 1,
    local: Annotated[bool, typer.Option("--local", help="Evaluate in this machine's process, without Ray.")] = False,
    out: Annotated[Path | None, typer.Option("--output", "-o", help="stats: the .npz to write.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object of metrics (null = not computed).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the job's output.")] = False,
) -> None:
    """Evaluate a registered tokenizer (PSNR, SSIM, LPIPS, rFID) or MaskGIT (FID, IS, NLL, class accuracy) and
    write the numbers onto its model card; or `vqtrain eval stats SHARDS -o ref.npz --fid-weights W`."""
    env = child_env()
    log_path = new_log("eval")
    if target == "stats":
        if not shards or out is None or not fid_weights:
            raise fail("usage: vqtrain eval stats SHARDS -o ref.npz --fid-weights WEIGHTS [--image-size N] [--num N]")
        cmd = [sys.executable, "-m", "jobs.eval_job", "stats", shards, "-o", str(out), "--fid-weights", fid_weights,
               "--image-size", str(image_size or 32)] + (["--num", str(num)] if num else [])
        code, result = run_child(cmd, env, log_path, "stats", verbose)
        if code != 0:
            raise fail(f"stats failed (exit {code}); log: {log_path}", 1)
        typer.echo(json.dumps(result) if as_json else f"{result['images']} images -> {result['out']}")
        return
    if shards is not None:
        raise fail(f"unexpected argument {shards!r}: give the eval shards with --data")
    if not data:
        raise fail("--data SHARDS is required (the eval split to judge the model on)")
    try:
        uri = registry.model_uri(target)  # NAME (the newest version), NAME@ALIAS, NAME/VERSION or models:/…
    except ValueError as e:
        raise fail(str(e)) from None
    name = re.sub(r"[^a-z0-9\-_.]", "-", ("eval-" + uri[len("models:/"):]).lower())[:100]
    evaluation: dict = {k: v for k, v in {
        "fid_weights": fid_weights, "classifier": classifier, "reference_stats": reference_stats,
        "lpips_weights": (lpips_weights[0] if len(lpips_weights) == 1 else lpips_weights) if lpips_weights else None,
        "num_samples": num, "sample_steps": steps, "guidance": guidance,
    }.items() if v is not None}
    doc = {"kind": "eval", "name": name, "evaluate": uri, "evaluation": evaluation,
           "data": {"eval": data, "image_size": image_size or 32},
           "resources": {"workers": workers, "max_failures": 0}}
    try:
        # local paths (weights, data) as absolute ones: a Ray worker runs in another folder
        spec = absolute_paths(parse_spec(doc), Path.cwd())  # refused before anything is contacted or started
        doc = spec.model_dump(mode="json")
        mlflow_uri = tracking_uri()
        if image_size is None and (card_size := _card_image_size(uri, mlflow_uri)):
            spec = parse_spec({**doc, "data": {**doc["data"], "image_size": card_size}})
    except SpecError as e:
        print_spec_error(e, "vqtrain eval")
        raise typer.Exit(2) from None
    env["MLFLOW_TRACKING_URI"] = mlflow_uri
    env.update(spec_env(spec.model_dump(mode="json")))
    module = ["jobs.eval_job", "--local"] if local else ["jobs.run"]
    code, result = run_child([sys.executable, "-m", *module, "--spec-env", SPEC_ENV], env, log_path, name, verbose)
    if code != 0:
        print_tail(log_path, 15)
        raise fail(f"evaluation of {uri} failed (exit {code}); full log: {log_path}", 1)
    metrics = result.get("metrics") or {}
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(f"model:      {result.get('model', uri)}")
    for key in [k for k in HEADLINE if k in metrics] + sorted(k for k in metrics if k not in HEADLINE):
        v = metrics[key]
        typer.echo(f"  {key:<22} {'not computed' if v is None else f'{v:.6g}'}")
    if result.get("run_url"):
        typer.echo(f"MLflow run: {result['run_url']}")


def sample_command(
    target: Annotated[str, typer.Argument(help="models:/NAME@ALIAS of a MaskGIT (or a local model dir).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder: <label>/<n>.png and grid.png.")],
    labels: Annotated[str | None, typer.Option("--labels", help="Class indices, e.g. 3,5 (one image each).")] = None,
    per_class: Annotated[int | None, typer.Option("--per-class", min=1, help="Images of every class.")] = None,
    num: Annotated[int | None, typer.Option("--num", min=1, help="Images of an unconditional model.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Decoding steps (default 8).")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance", min=0, help="Classifier-free guidance.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0, help="Token sampling temperature.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same images.")] = 0,
) -> None:
    """Sample images from a registered MaskGIT, decoded by the tokenizer version it was trained on."""
    if labels is None and per_class is None and num is None:
        raise fail("give --labels 3,5, --per-class N or (unconditional) --num N")
    try:
        uri = target if Path(target).exists() else registry.model_uri(target)
    except ValueError as e:
        raise fail(str(e)) from None
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri())
    cmd = [sys.executable, "-m", "jobs.sample", uri, "-o", str(out), "--seed", str(seed)]
    for flag, value in (("--labels", labels), ("--per-class", per_class), ("--num", num), ("--steps", steps),
                        ("--guidance", guidance), ("--temperature", temperature)):
        if value is not None:
            cmd += [flag, str(value)]
    log_path = new_log("sample")
    code, result = run_child(cmd, env, log_path, "sample", verbose=False)
    if code != 0:
        print_tail(log_path, 10)
        raise fail(f"sampling from {uri} failed (exit {code}); log: {log_path}", code if code == 2 else 1)
    typer.echo(f"{result['images']} images ({result['size'][0]}x{result['size'][1]}) -> {result['out']}; "
               f"grid: {result['grid']}")

