"""kind=tokenize on Ray Train: encode a dataset once with a registered tokenizer into token shards.

Every worker encodes its exact share of the images (the eval-mode loader: each sample once, split by
rank) into `<output>/<split>/part-<rank>/`; rank 0 then writes `<output>/<split>/manifest.json` listing
every part's shards, so MaskGIT jobs read `<output>/train` like any shard set. The splits are `train`
(from `data.train`) and `eval` (from `data.eval`, when given). A restarted job encodes again from scratch
(parts are overwritten; nothing half-written is ever listed in a manifest).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from jobs.job import JobEnv, finish_job, open_job
from jobs.progress import Progress
from jobs.tracking import OUTPUT_TAG
from jobs.worker import all_gather, is_distributed

TOKENS_PER_SHARD = 10000


def tokenize_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of a kind=tokenize job."""
    from vqbase.fetch import fetch_model_dir
    from vqmodels import load_tokenizer

    env = open_job(config)
    spec, worker = env.spec, env.worker
    tok = load_tokenizer(spec.tokenizer, map_location=worker.device, tracking_uri=env.tracking_uri,
                         fetch=fetch_model_dir)
    out = spec.output.rstrip("/")
    outputs: dict[str, str] = {}
    totals: dict[str, float] = {}
    for split, source in (("train", spec.data.train), ("eval", spec.data.eval)):
        if source is None:
            continue
        dest = f"{out}/{split}"
        counts = encode_split(env, tok, source, dest, split)
        totals.update({f"{split}/{k}": v for k, v in counts.items()})
        outputs[split] = dest

    def log_output() -> None:
        env.run.log_metrics(totals, step=0)
        env.run.set_tag(OUTPUT_TAG, out)

    finish_job(env, {"output": out, **{f"output_{k}": v for k, v in outputs.items()}, **totals}, log_output)


def encode_split(env: JobEnv, tok: Any, source: Any, dest: str, split: str) -> dict[str, float]:
    """Encode this rank's share of `source` into `dest/part-<rank>/`; rank 0 writes the merged manifest."""
    from jobs.data.loader import make_image_loader
    from jobs.data.tokens import encode_images
    from vqbase.protocol import allowed_roots_from_env

    spec, worker = env.spec, env.worker
    d = spec.data
    loader = make_image_loader(
        source, image_size=d.image_size, batch_size=spec.optim.batch_size, train=False, rank=worker.rank,
        world_size=worker.world_size, num_workers=d.num_workers, storage_options=d.storage_options,
        allowed_roots=allowed_roots_from_env(),
    )
    progress = Progress(env.progress.sink, len(loader), worker)
    start = time.perf_counter()

    def report(batches: int, written: int) -> None:
        rate = written * worker.world_size / max(time.perf_counter() - start, 1e-9)
        progress.update(batches, {f"{split}/encoded": written * worker.world_size}, rate)

    part, written = encode_images(
        lambda images: tok.encode(images.to(worker.device)), loader, source, f"{dest}/part-{worker.rank:05d}",
        codebook_size=tok.config.codebook_size, image_size=d.image_size, per_shard=TOKENS_PER_SHARD,
        storage_options=d.storage_options, tokenizer=spec.tokenizer, key_prefix=f"r{worker.rank:05d}-",
        on_batch=report,
    )
    # on the worker's device: an NCCL group (GPU jobs) cannot reduce CPU tensors
    stats = torch.tensor([float(written), float(loader.skipped)], dtype=torch.float64, device=worker.device)
    parts = all_gather(part)
    if is_distributed():
        dist.all_reduce(stats)
    if worker.is_main:
        _write_merged_manifest(dest, parts, d.storage_options)
    return {"encoded": float(stats[0]), "skipped_samples": float(stats[1])}


def _write_merged_manifest(dest: str, parts: list[Any], storage_options: dict[str, Any]) -> str:
    """One manifest over all ranks' parts (shard URLs relative to `dest`)."""
    import dataclasses

    from jobs.data.manifest import Manifest, write_manifest

    first = parts[0]
    shards = [
        dataclasses.replace(s, url=f"part-{rank:05d}/{s.url}") for rank, p in enumerate(parts) for s in p.shards
    ]
    meta = dict(first.meta)
    meta["skipped"] = sum(int(p.meta.get("skipped", 0)) for p in parts)
    meta["grid"] = next((p.meta["grid"] for p in parts if p.meta.get("grid")), [])
    merged = Manifest(name=first.name, kind="tokens", shards=shards, class_names=first.class_names, meta=meta)
    return write_manifest(merged, dest, storage_options)
