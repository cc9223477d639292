"""Data throughput: decoded images/s per dataloader worker, from local shards and from an S3 endpoint,
against what one stage-one training worker consumes. Prints JSON (and writes it with --out).

    .venv/bin/python bench/data_throughput.py [--images 10000] [--image-size 32] [--out bench/data_throughput.json]

Per-worker rate: one ShardStream iterated in this process (exactly the work one DataLoader worker does:
read tar, shuffle buffer, JPEG decode, resize/crop, to float [-1, 1], batch), one torch thread.
Loader rate: the full loader with 2 DataLoader workers (the machine has 2 cores).
Rates are given per wall-clock second and per CPU second of the measuring process; on a shared machine
the CPU-second rates (and ratios) are the stable ones. Ratios compare each data run with the consumer
runs measured just before and after it.
S3: moto's server in a subprocess on 127.0.0.1 (a real HTTP S3 API, so request/transfer costs are paid).
Consumer: a training step (forward, MSE loss, backward, Adam) of a fixed tiny conv autoencoder at the
same image size, one torch thread, batch 64 - a stand-in that is *lighter* than the real stage-one
tokenizer, so the measured consumption is an upper bound and the ratio a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.data.loader import ImageDecoder, make_image_loader  # noqa: E402
from jobs.data.manifest import resolve_shards  # noqa: E402
from jobs.data.shards import make_shards  # noqa: E402
from jobs.data.stream import ShardStream  # noqa: E402

CIFAR_TAR = ROOT.parent / "shared/data/cifar10/train.tar"
TARGET_RATIO = 3.0


def extract_slice(n: int, dest: Path) -> Path:
    """The first n/10 images of each CIFAR-10 class as an image folder."""
    per_class = n // 10
    wanted = {f"{i:04d}.jpg" for i in range(per_class)}
    with tarfile.open(CIFAR_TAR, "r:") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isreg() and len(parts) == 3 and parts[2] in wanted:
                out = dest / m.name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
    return dest / "train"


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def worker_rate(source: str, opts: dict | None, size: int, batch: int, batches: int, seed: int) -> dict:
    """Images/s of one stream (= one dataloader worker): per wall-clock second and per CPU second."""
    stream = ShardStream(resolve_shards(source, opts), ImageDecoder(size), batch_size=batch,
                         epoch_batches=batches + 1, seed=seed, storage_options=opts, shuffle_buffer=1000)
    it = iter(stream)
    next(it)  # the first batch pays for the shuffle buffer fill and connection set-up
    t, c = time.perf_counter(), time.process_time()
    n = sum(len(b["y"]) for b in it)
    return {"wall": n / (time.perf_counter() - t), "cpu": n / (time.process_time() - c)}


def loader_rate(source: str, opts: dict | None, size: int, batch: int, batches: int, workers: int) -> dict:
    """Images/s of the full loader (DataLoader with `workers` processes), start-up excluded."""
    loader = make_image_loader(source, image_size=size, batch_size=batch, epoch_batches=batches + 1,
                               num_workers=workers, storage_options=opts, timeout=120)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = sum(len(b.labels) for b in it)
    return {"images_per_s": round(n / (time.perf_counter() - t), 1), "workers": workers}


def tiny_autoencoder() -> nn.Module:
    """Fixed stand-in for a stage-one tokenizer: 32 px -> 8×8×64 latent -> 32 px (≈0.5 M parameters)."""
    enc = nn.Sequential(nn.Conv2d(3, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(),
                        nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(), nn.Conv2d(128, 64, 1))
    dec = nn.Sequential(nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
                        nn.ConvTranspose2d(64, 3, 4, 2, 1))
    return nn.Sequential(enc, dec)


def train_rate(model: nn.Module, opt: torch.optim.Optimizer, size: int, batch: int, seconds: float) -> dict:
    """Images/s of stage-one-like training steps (one torch thread): per wall-clock and per CPU second."""
    x = torch.rand(batch, 3, size, size) * 2 - 1
    n, t, c = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t < seconds:
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += batch
    return {"wall": n / (time.perf_counter() - t), "cpu": n / (time.process_time() - c)}


def summary(runs: list[dict]) -> dict:
    return {
        "images_per_s": round(statistics.median(r["wall"] for r in runs), 1),
        "images_per_cpu_s": round(statistics.median(r["cpu"] for r in runs), 1),
        "runs_images_per_s": [round(r["wall"], 1) for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=40, help="timed batches per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-seconds", type=float, default=4.0, help="length of each consumer run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not CIFAR_TAR.is_file():
        sys.exit(f"missing {CIFAR_TAR}")
    result: dict = {
        "benchmark": "data_throughput",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()]},
        "image_size": args.image_size, "batch": args.batch, "images": args.images, "per_shard": args.per_shard,
    }
    moto, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = extract_slice(args.images, Path(tmp) / "src")
            local = str(Path(tmp) / "shards")
            make_shards(str(folder), local, per_shard=args.per_shard, progress=False)
            opts = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
            import s3fs

            s3fs.S3FileSystem(**opts).mkdir("bench")
            remote = "s3://bench/cifar"
            make_shards(str(folder), remote, per_shard=args.per_shard, progress=False, storage_options=opts)

            size, b, nb = args.image_size, args.batch, args.batches
            torch.manual_seed(0)
            model = tiny_autoencoder()
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            train_rate(model, opt, size, 64, 1.0)  # warm-up
            # The machine is shared and its load drifts: interleave consumer and data runs and compare
            # each data run with the consumer runs on either side of it.
            runs: dict[str, list[dict]] = {"consumer": [], "local_worker": [], "s3_worker": []}
            ratios: dict[str, list[float]] = {"local": [], "s3": [], "local_cpu": [], "s3_cpu": []}
            before = train_rate(model, opt, size, 64, args.train_seconds)
            runs["consumer"].append(before)
            for r in range(args.repeats):
                loc = worker_rate(local, None, size, b, nb, r)
                s3 = worker_rate(remote, opts, size, b, nb, r)
                after = train_rate(model, opt, size, 64, args.train_seconds)
                runs["local_worker"].append(loc)
                runs["s3_worker"].append(s3)
                runs["consumer"].append(after)
                for key in ("wall", "cpu"):
                    consume = (before[key] + after[key]) / 2
                    suffix = "" if key == "wall" else "_cpu"
                    ratios["local" + suffix].append(loc[key] / consume)
                    ratios["s3" + suffix].append(s3[key] / consume)
                before = after
            for k, v in runs.items():
                result[k] = summary(v)
            result["consumer"].update(model="tiny conv autoencoder", batch=64, threads=1,
                                      parameters=sum(p.numel() for p in model.parameters()))
            result["ratio"] = {k: round(statistics.median(v), 2) for k, v in ratios.items()}
            result["local_loader"] = loader_rate(local, None, size, b, nb * 2, 2)
            result["s3_loader"] = loader_rate(remote, opts, size, b, nb * 2, 2)
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    result["target_ratio"] = TARGET_RATIO
    result["meets_target"] = min(result["ratio"].values()) >= TARGET_RATIO
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
