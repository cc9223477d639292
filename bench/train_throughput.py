"""Training throughput: images/s of a 1-worker tokenizer job (Ray Train, shards, MLflow logging) against the
same model in a plain in-memory PyTorch loop, and the share of step time spent syncing the codebook at 2
workers. Prints JSON (and writes it with --out).

    .venv/bin/python bench/train_throughput.py [--images 4000] [--steps 60] [--out bench/results/train_throughput.json]

Both sides train the tokenizer of examples/tokenizer-cifar-local.yaml (32 px, channels 64, 512 codes,
preset "default") at batch 64 with one torch thread, for `--steps` steady steps after 5 warm-up steps.
- job: `jobs.run.run_job` on a local Ray with one training worker (1 CPU) streaming local WebDataset shards
  through one dataloader worker, logging every step to a real `mlflow server`; its rate is the job's own
  steady-state figure (step end to step end, data loading and logging included; eval/checkpoints excluded).
- plain: the same model, optimiser and loss in a bare loop over images already decoded into one tensor.
- sync share: a 2-worker job; the time inside the quantizer's collectives (`vqmodels.quantize.dist`,
  timed by `jobs.progress.SyncClock`) over the step time.
The machine is shared, so the plain loop runs before and after the job and the job is compared with their
mean; rates per CPU second of the training process are reported too (they swing less with load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CIFAR_TAR = ROOT.parent / "shared/data/cifar10/train.tar"
TARGET_RATIO = 0.90
TARGET_SYNC_SHARE = 0.05
WARMUP = 5
BATCH = 64


def extract_slice(n: int, dest: Path) -> Path:
    """The first n/10 images of each CIFAR-10 class as an image folder."""
    per_class = n // 10
    wanted = {f"{i:04d}.jpg" for i in range(per_class)}
    with tarfile.open(CIFAR_TAR) as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isreg() and len(parts) == 3 and parts[2] in wanted:
                out = dest / parts[1] / parts[2]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())
    return dest


def spec_dict(shards: str, steps: int, workers: int, ckpt: str) -> dict[str, Any]:
    return {
        "kind": "tokenizer",
        "name": f"bench-throughput-{workers}w",
        "data": {"train": shards, "image_size": 32, "shuffle_buffer": 1000,
                 "num_workers": 1 if workers == 1 else 0},
        "model": {"channels": 64, "channel_mult": [1, 2, 2], "res_blocks": 1, "code_dim": 32, "codebook_size": 512},
        "quantizer": {"preset": "default"},
        "optim": {"steps": steps, "batch_size": BATCH, "lr": 3e-4},
        "resources": {"workers": workers, "cpus_per_worker": 1, "max_failures": 0},
        "checkpoint": {"every": steps, "storage": ckpt},
        "tracking": {"experiment": "bench", "eval_every": 0, "image_every": 0},
        "register": {"alias": None},
    }


def plain_loop(spec: Any, images: torch.Tensor, steps: int) -> dict[str, float]:
    """The same model, optimiser and loss in a bare loop over in-memory images; one torch thread."""
    from jobs.build import tokenizer_config
    from vqmodels.tokenizer import Tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = Tokenizer(tokenizer_config(spec))
    params = tok.generator_parameters()
    opt = torch.optim.AdamW(params, lr=spec.optim.lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    t0 = c0 = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            t0, c0 = time.perf_counter(), time.process_time()
        x = images[torch.randint(len(images), (BATCH,), generator=g)]
        out = tok(x, step)
        opt.zero_grad(set_to_none=True)
        out.losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, spec.optim.grad_clip)
        opt.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": steps * BATCH / wall, "images_per_cpu_s": steps * BATCH / cpu}


def decode_all(shards: str, n: int) -> torch.Tensor:
    from jobs.data.loader import make_image_loader

    loader = make_image_loader(shards, image_size=32, batch_size=256, train=False, rank=0, world_size=1,
                               num_workers=0)
    return torch.cat([b.images[b.valid] for b in loader])[:n]


def job_run(spec: dict[str, Any], mlflow_url: str) -> dict[str, float]:
    from mlflow import MlflowClient

    from jobs.run import run_job
    from jobs.spec import parse_spec

    result = run_job(parse_spec(spec), tracking_uri=mlflow_url, out=open(os.devnull, "w"))  # noqa: SIM115
    m = MlflowClient(mlflow_url).get_run(result["run_id"]).data.metrics
    return {
        "images_per_s": m["train/images_per_s_steady"],
        "images_per_cpu_s": m["train/images_per_cpu_s_steady"],
        "codebook_sync_share": m["train/codebook_sync_share_steady"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=60, help="steady steps measured (after 5 warm-up steps)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import ray

    from jobs.data.shards import make_shards
    from jobs.spec import parse_spec
    from vqbase.local import start_mlflow_server

    with tempfile.TemporaryDirectory(prefix="vqtrain-bench-") as tmp:
        tmp_path = Path(tmp)
        src = extract_slice(args.images, tmp_path / "images")
        shards = str(tmp_path / "shards")
        make_shards(str(src), shards, per_shard=500, progress=False)
        server = start_mlflow_server(tmp_path / "mlflow")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            steps = WARMUP + args.steps
            one = spec_dict(shards, steps, 1, str(tmp_path / "ckpt"))
            images = decode_all(shards, args.images)
            plain_before = plain_loop(parse_spec(one), images, args.steps)
            job = job_run(one, server.url)
            plain_after = plain_loop(parse_spec(one), images, args.steps)
            two = job_run(spec_dict(shards, steps, 2, str(tmp_path / "ckpt")), server.url)
        finally:
            ray.shutdown()
            server.stop()

    plain = {k: (plain_before[k] + plain_after[k]) / 2 for k in plain_before}
    report = {
        "bench": "train_throughput",
        "config": {"images": args.images, "steady_steps": args.steps, "warmup_steps": WARMUP, "batch": BATCH,
                   "image_size": 32, "model": one["model"], "quantizer_preset": "default"},
        "plain_before": plain_before,
        "plain_after": plain_after,
        "plain": plain,
        "job_1_worker": job,
        "ratio_wall": job["images_per_s"] / plain["images_per_s"],
        "ratio_cpu": job["images_per_cpu_s"] / plain["images_per_cpu_s"],
        "target_ratio": TARGET_RATIO,
        "job_2_workers": two,
        "codebook_sync_share_2_workers": two["codebook_sync_share"],
        "target_sync_share": TARGET_SYNC_SHARE,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
