"""API load: N concurrent job submissions against a running service; every job must be stored exactly
once (also when every request is retried with its Idempotency-Key); reports p50/p99 latency as JSON.

    # against a running service (VQTRAIN_URL / VQTRAIN_TOKEN, or `vqtrain serve` on this machine)
    .venv/bin/python bench/api_load.py --out bench/results/api_load.json
    # self-contained: local Ray head + MLflow + the API in this process, in a temporary VQTRAIN_HOME
    .venv/bin/python bench/api_load.py --embedded --out bench/results/api_load.json

The spec is cheap (a tiny tokenizer on s3 shards that do not exist); the bench cancels its jobs at the
end, so at most `max_active_jobs` of them ever start on Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cheap_spec(name: str) -> dict:
    return {
        "kind": "tokenizer",
        "name": name,
        "data": {"train": "s3://vqtrain-bench/missing/train-{000000..000003}.tar"},
        "model": {"channels": 8, "channel_mult": [1, 2], "code_dim": 8, "codebook_size": 16},
        "optim": {"steps": 1, "batch_size": 8},
        "resources": {"workers": 1, "max_failures": 0},
        "tracking": {"experiment": "api-load-bench", "eval_every": 0, "image_every": 0},
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def burst(client: httpx.AsyncClient, specs: list[dict], keys: list[str]) -> list[tuple[int, str, float]]:
    """All submissions at once; (status, job id, seconds) per request."""

    async def one(spec: dict, key: str) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        r = await client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        dt = time.perf_counter() - t0
        return r.status_code, (r.json().get("id") if r.status_code < 300 else r.text), dt

    return await asyncio.gather(*(one(s, k) for s, k in zip(specs, keys, strict=True)))


async def run_bench(url: str, token: str, n: int, sequential: int = 20) -> dict:
    tag = uuid.uuid4().hex[:8]
    names = [f"bench-{tag}-{i:03d}" for i in range(n)]
    keys = [f"bench-{tag}-{i:03d}" for i in range(n)]
    solo_names = [f"bench-{tag}-solo-{i:03d}" for i in range(sequential)]
    specs = [cheap_spec(name) for name in names]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        await client.get("/healthz")  # connection warm-up outside the measurement
        solo = []  # one request at a time: the latency without queueing
        for name in solo_names:
            t1 = time.perf_counter()
            r = await client.post("/v1/jobs", json=cheap_spec(name))
            solo.append(((time.perf_counter() - t1) * 1000, r.json()["id"]))
        t0 = time.perf_counter()
        first = await burst(client, specs, keys)
        wall = time.perf_counter() - t0
        replay = await burst(client, specs, keys)  # every request retried: must not store anything new

        listed: list[dict] = []
        offset = 0
        while True:
            page = (await client.get("/v1/jobs", params={"limit": 500, "offset": offset})).json()
            listed += page["items"]
            offset += len(page["items"])
            if offset >= page["total"] or not page["items"]:
                break
        ours = [j for j in listed if j["name"].startswith(f"bench-{tag}-") and "-solo-" not in j["name"]]
        ids = [job_id for _, job_id, _ in first]

        cancel_t = []
        for chunk in range(0, n, 25):  # clean up: cancel every bench job
            t1 = time.perf_counter()
            await asyncio.gather(*(client.post(f"/v1/jobs/{i}/cancel") for i in ids[chunk : chunk + 25]))
            cancel_t.append((time.perf_counter() - t1) / len(ids[chunk : chunk + 25]))
        for _, job_id in solo:
            await client.post(f"/v1/jobs/{job_id}/cancel")

    lat = [dt * 1000 for _, _, dt in first]
    by_name: dict[str, int] = {}
    for j in ours:
        by_name[j["name"]] = by_name.get(j["name"], 0) + 1
    return {
        "submissions": n,
        "concurrency": n,
        "status_codes": sorted({code for code, _, _ in first}),
        "all_created": all(code == 201 for code, _, _ in first),
        "distinct_ids": len(set(ids)),
        "stored_jobs": len(ours),
        "stored_exactly_once": len(ours) == n and all(v == 1 for v in by_name.values()) and len(by_name) == n,
        "replay_status_codes": sorted({code for code, _, _ in replay}),
        "replay_same_ids": [job_id for _, job_id, _ in replay] == ids,
        "latency_ms": {
            "p50": round(statistics.median(lat), 1),
            "p90": round(pct(lat, 0.90), 1),
            "p99": round(pct(lat, 0.99), 1),
            "max": round(max(lat), 1),
            "mean": round(statistics.fmean(lat), 1),
        },
        "sequential_latency_ms": {
            "n": sequential,
            "p50": round(statistics.median(ms for ms, _ in solo), 1) if solo else None,
            "p90": round(pct([ms for ms, _ in solo], 0.9), 1) if solo else None,
        },
        "burst_wall_s": round(wall, 3),
        "submissions_per_s": round(n / wall, 1),
        "replay_latency_ms_p50": round(statistics.median(dt * 1000 for _, _, dt in replay), 1),
    }


@contextlib.contextmanager
def embedded_service(max_active_jobs: int, num_cpus: int) -> Iterator[tuple[str, str, dict]]:
    """Ray head + MLflow + the API (uvicorn, one process) in a temporary VQTRAIN_HOME."""
    import uvicorn

    from service import embedded
    from service.api.app import create_app
    from service.settings import Settings
    from vqbase.local import free_port, start_mlflow_server

    home = Path(tempfile.mkdtemp(prefix="vqtrain-bench-"))
    token = uuid.uuid4().hex
    t0 = time.perf_counter()
    head = embedded.start_ray_head(home, num_cpus=num_cpus)
    mlflow = start_mlflow_server(home / "mlflow")
    settings = Settings(
        home=home, ray_address=head.address, mlflow_uri=mlflow.url, tokens=[{"name": "bench", "token": token}],
        max_active_jobs=max_active_jobs, allowed_roots=[str(home)],
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    info = {"mode": "embedded", "max_active_jobs": max_active_jobs, "startup_s": round(time.perf_counter() - t0, 1),
            "store": "sqlite", "uvicorn_workers": 1}  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", token, info
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        head.stop()
        mlflow.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=100, help="concurrent submissions")
    p.add_argument("--sequential", type=int, default=20, help="one-at-a-time submissions measured first")
    p.add_argument("--url", default=os.environ.get("VQTRAIN_URL"))
    p.add_argument("--token", default=os.environ.get("VQTRAIN_TOKEN"))
    p.add_argument("--embedded", action="store_true", help="start Ray, MLflow and the API here")
    p.add_argument("--max-active-jobs", type=int, default=2, help="(embedded) jobs on Ray at once")
    p.add_argument("--num-cpus", type=int, default=2, help="(embedded) CPUs of the Ray head")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    if args.embedded:
        ctx = embedded_service(args.max_active_jobs, args.num_cpus)
    else:
        from service.cli.client import find_api

        api = find_api() if not args.url else None
        url, token = (args.url, args.token) if args.url else ((api.url, api.token) if api else (None, None))
        if not url:
            sys.exit("no service: give --url/--token, set VQTRAIN_URL, run `vqtrain serve`, or use --embedded")
        ctx = contextlib.nullcontext((url, token, {"mode": "external"}))
    with ctx as (url, token, info):
        result = asyncio.run(run_bench(url, token, args.n, args.sequential))
    result |= {"service": info, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if not (result["all_created"] and result["stored_exactly_once"] and result["replay_same_ids"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
