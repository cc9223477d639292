"""`kind: eval`: judge a registered tokenizer or MaskGIT on an eval split and write the numbers onto its
model card. The same loop runs on Ray Train (`python -m jobs.run`, what `vqtrain eval` and the API start)
and, with `--local`, in one process without Ray (`python -m jobs.eval_job --local SPEC`).

The model is pinned to one version when the job starts; the run is tagged with it (`vqtrain.evaluated_model`)
and the version gets `eval.<dataset>.<metric>` tags, the protocol, the run's id and a rebuilt description.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from jobs.batches import eval_batches
from jobs.evaluation import masked_nll, sample_metrics, tokenizer_metrics
from jobs.job import open_job
from jobs.judges import load_judges, record_judges
from jobs.model_card import dataset_name, eval_tags
from jobs.run import eval_result, pin_evaluated
from jobs.worker import Worker, worker_context
from vqbase.protocol import result_line


def eval_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a kind=eval job."""
    import ray.train

    env = open_job(config)
    metrics = evaluate_registered(env.spec, env.worker, env.run, env.tracking_uri)
    ray.train.report({k: v for k, v in metrics.items() if v is not None})


def model_kind(uri: str, tracking_uri: str | None) -> str:
    """'tokenizer' or 'maskgit': what the registered version holds (its config.json says)."""
    import mlflow.artifacts

    for kind in ("tokenizer", "maskgit"):
        try:
            text = mlflow.artifacts.load_text(f"{uri}/artifacts/{kind}/config.json")
        except Exception:  # noqa: BLE001 - not this kind (or an older layout): try the next
            continue
        if json.loads(text).get("model") == kind:
            return kind
    raise ValueError(f"evaluate: {uri} holds neither a vqtrain tokenizer nor a MaskGIT")


@torch.no_grad()
def evaluate_registered(spec: Any, worker: Worker, run: Any | None, tracking_uri: str | None) -> dict[str, float | None]:
    """Every rank: the metrics of `spec.evaluate` on `spec.data.eval`; rank 0 logs them and updates the card."""
    from vqbase.fetch import fetch_model_dir
    from vqmodels import load_generator, load_tokenizer

    uri = spec.evaluate
    kind = model_kind(uri, tracking_uri)
    dev = worker.device
    judges = load_judges(spec.evaluation, kind, dev, spec.data.image_size, spec.data.storage_options, tracking_uri)
    judges.protocol["split"] = f"{spec.data.eval} (every image once), at {spec.data.image_size} px"
    if kind == "tokenizer":
        tok = load_tokenizer(uri, dev, tracking_uri, fetch=fetch_model_dir)
        res = tokenizer_metrics(tok, eval_batches(spec, worker), judges, dev)
        metrics = res.metrics if res is not None else {}
    else:
        from jobs.judges import sampling_protocol

        net, tok = load_generator(uri, dev, tracking_uri, fetch=fetch_model_dir)
        judges.protocol.update(sampling_protocol(spec.evaluation, net.config.num_classes))
        conditional = net.config.num_classes > 0
        tokens = ((tok.encode(x.to(dev)), y.to(dev) if conditional else y) for x, y in eval_batches(spec, worker))
        metrics = masked_nll(net, tokens, dev) or {}
        metrics.update(sample_metrics(net, tok, judges, spec.evaluation, worker.rank, worker.world_size, dev,
                                      lambda: eval_batches(spec, worker)))
    flat = eval_result(metrics, kind)
    if worker.is_main and run is not None:
        from jobs.tracking import EVALUATED_KIND_TAG, EVALUATED_TAG

        run.set_tag(EVALUATED_TAG, uri)
        run.set_tag(EVALUATED_KIND_TAG, kind)
        record_judges(run, judges)
        run.log_metrics(metrics, 0)
        run.log_text(json.dumps({"model": uri, "metrics": flat, "protocol": judges.protocol,
                                 "not_computed": judges.skipped}, indent=2), "eval/final.json")
        run.close()
        _update_card(run, uri, spec, metrics, judges)
    return flat


def _update_card(run: Any, uri: str, spec: Any, metrics: dict[str, float], judges: Any) -> None:
    from jobs.model_card import update_card
    from vqbase.uris import parse_model_uri

    ref = parse_model_uri(uri)  # the pinned version this job evaluated
    name, version = ref.name, str(ref.version)
    ds = dataset_name(spec.data.eval)
    tags = eval_tags(ds, metrics, judges.protocol, judges.skipped)
    tags[f"eval.{ds}.run"] = run.run_id
    update_card(run.client, name, version, tags)


@torch.no_grad()
def reference_stats(shards: str, out: str, fid_weights: str, image_size: int = 32, max_images: int | None = None,
                    sha256: str | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inception statistics of a dataset's images, saved as `.npz` (mu, sigma, n): computed once, then any
    number of generator FIDs compare with it (`evaluation.reference_stats`)."""
    from jobs.data.loader import make_image_loader
    from jobs.eval_weights import fetch, sha256_of
    from vqmodels.metrics import GaussianStats, to_uint8
    from vqmodels.metrics.inception import load_inception

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = fetch(fid_weights, "--fid-weights", sha256, storage_options)
    net = load_inception(path, dev)
    stats = GaussianStats(2048, dev)
    loader = make_image_loader(shards, image_size=image_size, batch_size=100, train=False, rank=0, world_size=1,
                               num_workers=1, storage_options=storage_options)
    for batch in loader:
        x = batch.images[batch.valid]
        if max_images is not None:
            x = x[: max(0, max_images - stats.count)]
        if x.shape[0]:
            stats.update(net(to_uint8(x.to(dev)))[0])
        if max_images is not None and stats.count >= max_images:
            break
    stats.save(out, source=shards, image_size=str(image_size), weights_sha256=sha256_of(path))
    return {"out": str(out), "images": stats.count, "source": shards, "image_size": image_size}


def stats_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jobs.eval_job stats")
    p.add_argument("shards")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--fid-weights", required=True)
    p.add_argument("--sha256")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num", type=int)
    a = p.parse_args(argv)
    try:
        result = reference_stats(a.shards, a.out, a.fid_weights, a.image_size, a.num, a.sha256)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result_line(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`--local`: evaluate in this process (one worker, no Ray); prints the VQTRAIN_RESULT line.
    `stats SHARDS -o OUT --fid-weights W`: reference statistics of a dataset."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "stats":
        return stats_main(argv[1:])
    import argparse
    import uuid

    from mlflow import MlflowClient

    from jobs import tracking
    from jobs.run import _read_spec
    from jobs.spec import SpecError

    parser = argparse.ArgumentParser(prog="python -m jobs.eval_job")
    parser.add_argument("spec", nargs="?")
    parser.add_argument("--spec-json")
    parser.add_argument("--spec-env")
    parser.add_argument("--local", action="store_true", required=True, help="run here, without Ray")
    args = parser.parse_args(argv)
    try:
        spec = _read_spec(args)
        if spec.kind != "eval":
            raise SpecError([{"loc": "kind", "msg": "python -m jobs.eval_job runs kind=eval specs only"}])
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    uri = tracking.resolve_tracking_uri()
    client = MlflowClient(uri, registry_uri=uri)
    job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
    run_id, exp_id, _ = tracking.open_job_run(client, spec, job_id)
    spec = spec.model_copy(update={"evaluate": pin_evaluated(client, run_id, spec.evaluate)})
    run = tracking.RunLogger(uri, run_id)
    try:
        flat = evaluate_registered(spec, worker_context(int(spec.resources.cpus_per_worker)), run, uri)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    result = {"job_id": job_id, "run_id": run_id, "run_url": tracking.run_url(uri, exp_id, run_id),
              "model": spec.evaluate, "metrics": flat}
    print(result_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
