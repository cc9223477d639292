"""Service test fixtures: one real local Ray head and one real MLflow server for the session, CIFAR
shards, and live API servers (uvicorn on 127.0.0.1) that tests can stop and restart on the same store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from service import embedded
from service.api.app import create_app
from service.settings import Settings
from vqbase.local import free_port, start_mlflow_server

ADMIN, READER = "admin-token-for-tests", "reader-token-for-tests"
TOKENS = [{"name": "admin", "token": ADMIN}, {"name": "reader", "token": READER, "read_only": True}]
TERMINAL = ("succeeded", "failed", "cancelled")
NODE_SECRET = "node-secret-5e1f09c2a7"  # planted in the Ray node's environment; must never show up elsewhere
NODE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIANODE0000PLANTED1", "AWS_SECRET_ACCESS_KEY": NODE_SECRET}


@dataclass
class Backends:
    ray_address: str
    mlflow_uri: str
    home: Path


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """A local Ray head (2 CPUs) and an MLflow server, started side by side (each takes a while)."""
    home = tmp_path_factory.mktemp("vqtrain-home")
    with ThreadPoolExecutor(2) as pool:
        # the nodes hold storage credentials in their environment, as a cluster's would (docs/SECURITY.md)
        ray_f = pool.submit(embedded.start_ray_head, home, 2, 180.0, NODE_CREDENTIALS)
        mlflow_f = pool.submit(start_mlflow_server, home / "mlflow")
        try:
            head, mlflow = ray_f.result(), mlflow_f.result()
        except BaseException:
            for f in (ray_f, mlflow_f):
                if f.exception() is None:
                    f.result().stop()
            raise
    try:
        yield Backends(head.address, mlflow.url, home)
    finally:
        head.stop()
        mlflow.stop()


@pytest.fixture(scope="session")
def shards(cifar_slice, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WebDataset shards (+ manifest.json) of the 300-image CIFAR slice."""
    from jobs.data.shards import make_shards

    dest = tmp_path_factory.mktemp("shards")
    make_shards(str(cifar_slice.tar), str(dest), per_shard=100, progress=False)
    return dest / "manifest.json"


class LiveServer:
    """The real app under uvicorn in a thread; `stop()` and `start()` again = a service restart."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings, self.port = settings, port
        self.url = f"http://127.0.0.1:{port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LiveServer:
        config = uvicorn.Config(create_app(self.settings), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("API server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            assert self._thread is not None
            self._thread.join(timeout=60)
            self._server = None

    def client(self, token: str | None = ADMIN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture
def make_settings(backends: Backends, tmp_path: Path) -> Callable[..., Settings]:
    def make(**over) -> Settings:
        values = dict(
            home=tmp_path / "home",
            ray_address=backends.ray_address,
            mlflow_uri=backends.mlflow_uri,
            tokens=TOKENS,
            allowed_roots=[str(tmp_path), str(backends.home)],
            poll_interval=0.5,
        )
        return Settings(**(values | over))

    return make


@pytest.fixture
def live(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveServer]]:
    """Start live API servers; all are stopped at the end of the test."""
    started: list[LiveServer] = []

    def start(settings: Settings | None = None, port: int | None = None) -> LiveServer:
        server = LiveServer(settings or make_settings(), port or free_port()).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict:
    """Poll GET /v1/jobs/{id} until its state is one of `states` (fails on another terminal state)."""
    deadline = time.monotonic() + timeout
    while True:
        d = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if d["state"] in states:
            return d
        if d["state"] in TERMINAL:
            raise AssertionError(f"job ended {d['state']}, wanted {states}: {d.get('failure_reason')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {d['state']} after {timeout}s, wanted {states}")
        time.sleep(0.5)


def tiny_tokenizer_spec(train: Path, name: str, checkpoints: Path, steps: int = 6) -> dict:
    """A tokenizer job small enough for 2 shared CPUs."""
    return {
        "kind": "tokenizer",
        "name": name,
        "data": {"train": str(train), "image_size": 32, "shuffle_buffer": 16, "num_workers": 0},
        "model": {"channels": 8, "channel_mult": [1, 2], "code_dim": 8, "codebook_size": 16},
        "quantizer": {"kmeans_samples": 256, "kmeans_iters": 2},
        "optim": {"steps": steps, "batch_size": 8},
        "resources": {"workers": 1, "max_failures": 0},
        "checkpoint": {"every": 1000, "storage": str(checkpoints)},
        "tracking": {"experiment": "service-tests", "eval_every": 0, "image_every": 0},
    }
