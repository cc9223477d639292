"""Step time and codebook-sync share of one tokenizer job with its two workers on two Ray nodes vs one.

Both layouts are real clusters on this machine (tests/cluster/cluster.py: a head without CPUs plus worker
raylets with their own scratch), with shards and checkpoints on S3 (moto) and MLflow over HTTP; only the
node layout differs: two 1-CPU worker nodes (one worker each) or one 2-CPU worker node (both workers).
On one machine the node boundary adds no network hop (gloo talks over loopback either way), so this
measures what Ray and vqtrain add per node, not a data-centre network.

    python bench/cluster_nodes.py --steps 200 --out bench/results/cluster_nodes.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import servers  # noqa: E402
from tests.cluster.cluster import ray_cluster  # noqa: E402
from vqbase import protocol  # noqa: E402
from vqbase.local import start_mlflow_server  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "train.tar"


def cifar_slice(dest: Path, per_class: int) -> Path:
    """The first `per_class` images of each class of the shared CIFAR-10 tar, as a tar of the same layout."""
    counts: dict[str, int] = {}
    out = dest / "slice.tar"
    with tarfile.open(CIFAR) as src, tarfile.open(out, "w") as dst:
        for member in src:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or counts.get(parts[-2], 0) >= per_class:
                continue
            counts[parts[-2]] = counts.get(parts[-2], 0) + 1
            data = src.extractfile(member).read()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out


def spec(train: str, bucket: str, steps: int, name: str) -> dict:
    return {
        "kind": "tokenizer",
        "name": name,
        "data": {"train": train, "image_size": 32, "shuffle_buffer": 256, "num_workers": 0},
        "model": {"channels": 32, "channel_mult": [1, 2], "res_blocks": 1, "code_dim": 16, "codebook_size": 256},
        "optim": {"steps": steps, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10},
        "resources": {"workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        "checkpoint": {"every": steps, "storage": f"{bucket}/checkpoints"},
        "tracking": {"experiment": "bench-cluster", "eval_every": 0, "image_every": 0},
        "register": {"alias": "bench"},
    }


def run_layout(layout: str, root: Path, train: str, bucket: str, aws: dict, mlflow: str, steps: int) -> dict:
    from mlflow import MlflowClient

    nodes = {"two-nodes": [1, 1], "one-node": [2]}[layout]
    with ray_cluster(root / layout, 0, aws | {"MLFLOW_TRACKING_URI": mlflow}) as cluster:
        for i, cpus in enumerate(nodes):
            cluster.add_node(f"n{i + 1}", num_cpus=cpus)
        cluster.wait_for_workers(len(nodes))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= aws | {"VQTRAIN_RAY_ADDRESS": cluster.head.gcs_address, "RAY_AUTH_MODE": "token",
                "MLFLOW_TRACKING_URI": mlflow}  # fmt: skip
        job = spec(train, bucket, steps, f"bench-{layout}")
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "jobs.run", "--spec-json", json.dumps(job)], env=env,
                           capture_output=True, text=True, cwd=REPO)  # fmt: skip
        wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"{layout}: job failed\n{p.stderr[-3000:]}")
    result = protocol.parse_logs(p.stdout).result or {}
    m = MlflowClient(mlflow).get_run(result["run_id"]).data.metrics
    ips = m["train/images_per_s_steady"]
    return {
        "layout": layout,
        "worker_nodes": len(nodes),
        "images_per_s": round(ips, 1),
        "step_ms": round(1000 * 2 * job["optim"]["batch_size"] / ips, 1),
        "codebook_sync_share": round(m["train/codebook_sync_share_steady"], 4),
        "job_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from jobs.data.shards import make_shards

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, servers.moto_s3_server() as s3:
        root = Path(tmp)
        bucket = servers.make_bucket(s3, prefix="bench")
        make_shards(str(cifar_slice(root, args.per_class)), f"{bucket}/cifar", per_shard=250,
                    storage_options=servers.s3_storage_options(s3), progress=False)  # fmt: skip
        aws = {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": servers.S3_KEY,
               "AWS_SECRET_ACCESS_KEY": servers.S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        mlflow = start_mlflow_server(root / "mlflow")
        try:
            rows = [run_layout(layout, root, f"{bucket}/cifar/manifest.json", bucket, aws, mlflow.url, args.steps)
                    for layout in ("one-node", "two-nodes")]  # fmt: skip
        finally:
            mlflow.stop()
    report = {"bench": "cluster_nodes", "steps": args.steps, "cpu_count": os.cpu_count(), "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
