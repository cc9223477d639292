"""Fixtures of the training-job tests: a real `mlflow server`, one local Ray for the session, CIFAR-10
shards on the moto S3 endpoint, and one tiny tokenizer trained and registered once for every test that
needs a registered tokenizer (stage two, pull, load).

Starting a Ray Train worker group costs ~20-40 s on two shared cores, so the session's tokenizer job
is also the fault-injection job: one of its workers is killed at step 15 and the job resumes from its
step-10 checkpoint on S3 (`test_killed_worker_resumes_in_the_same_run` checks that part).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import servers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite, proxied local artifacts) on 127.0.0.1."""
    from vqbase.local import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def mlflow_client_uri(mlflow_url: str) -> Iterator[str]:
    """Point this process's global MLflow URI at the test server for one test (`models:/` registry
    lookups in `mlflow.artifacts` / `mlflow.pyfunc` follow the global URI), then restore it."""
    import mlflow

    before = mlflow.get_tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else None
    mlflow.set_tracking_uri(mlflow_url)
    try:
        yield mlflow_url
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="session")
def node_credentials(s3_server: str) -> Iterator[dict[str, str]]:
    """The S3 endpoint and credentials in this process's environment, as a cluster node has them (specs
    may not carry credentials): the job drivers run here, and the local Ray's workers inherit them."""
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": servers.S3_KEY,
           "AWS_SECRET_ACCESS_KEY": servers.S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env


@pytest.fixture(scope="session")
def ray_session(node_credentials: dict[str, str]) -> Iterator[None]:
    """One local Ray for all job tests (2 training workers fit; the rest are zero-CPU actors); its workers
    get the S3 credentials from the environment, like the nodes of a real cluster."""
    import ray

    # 4 logical CPUs for 2 training workers (the jobs' drivers are separate processes: see `run_spec`)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": node_credentials})  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class S3Shards:
    train: str  # s3://bucket/cifar/train (folder with manifest.json)
    eval: str
    bucket: str
    storage_options: dict[str, str]  # with credentials: for this process's own reads and writes
    count: int

    @property
    def spec_options(self) -> dict[str, str]:
        """What a job spec carries: the endpoint only (credentials come from the nodes' environment)."""
        return {"endpoint_url": self.storage_options["endpoint_url"]}


@pytest.fixture(scope="session")
def cifar_s3(s3_server: str, cifar_slice: Any) -> S3Shards:
    """The 300-image CIFAR-10 slice as WebDataset shards on S3: 3 train shards of 90, one eval shard of 30
    (the eval images are not in the train shards)."""
    import shutil

    from jobs.data.shards import make_shards

    opts = servers.s3_storage_options(s3_server)
    bucket = servers.make_bucket(s3_server, prefix="jobs")
    root = Path(cifar_slice.root)
    split = {"train": root / "split-train", "eval": root / "split-eval"}
    for cls in cifar_slice.classes:
        images = sorted((Path(cifar_slice.folder) / cls).glob("*.jpg"))
        for name, chosen in (("train", images[3:]), ("eval", images[:3])):
            (split[name] / cls).mkdir(parents=True, exist_ok=True)
            for img in chosen:
                shutil.copy(img, split[name] / cls / img.name)
    make_shards(str(split["train"]), f"{bucket}/cifar/train", per_shard=90, storage_options=opts, progress=False)
    make_shards(str(split["eval"]), f"{bucket}/cifar/eval", per_shard=90, storage_options=opts, progress=False)
    return S3Shards(f"{bucket}/cifar/train", f"{bucket}/cifar/eval", bucket, opts, cifar_slice.count)


def tiny_tokenizer_spec(shards: S3Shards, **overrides: Any) -> dict[str, Any]:
    """A tokenizer job small enough for 2 CPU workers in ~30 s: 16 px images -> 4x4 codes over 32 codes."""
    spec: dict[str, Any] = {
        "kind": "tokenizer",
        "name": f"tok-{uuid.uuid4().hex[:6]}",
        "data": {
            "train": shards.train,
            "eval": shards.eval,
            "image_size": 16,
            "storage_options": shards.spec_options,
            "shuffle_buffer": 64,
            "num_workers": 0,
        },
        "model": {"channels": 8, "channel_mult": [1, 2, 2], "res_blocks": 1, "code_dim": 8, "codebook_size": 32},
        "optim": {"steps": 30, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2},
        "resources": {"workers": 2, "max_failures": 2},
        "checkpoint": {"every": 10, "keep": 2, "storage": f"{shards.bucket}/checkpoints"},
        "tracking": {"experiment": "tests", "eval_every": 15, "image_every": 15},
        "register": {"alias": "candidate"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@dataclass(frozen=True)
class JobRun:
    spec: Any  # jobs.spec.JobSpec
    result: dict[str, Any]
    progress: str  # everything the driver printed


def run_spec(spec: dict[str, Any], mlflow_url: str, job_id: str | None = None) -> JobRun:
    """Validate, then run one job the way the service does: as its own driver process (`python -m jobs.run`,
    a Ray Jobs entrypoint in production) attached to the session's Ray, capturing what it prints.

    Not in this process: after another driver's job (the tokenize test's subprocess), Ray 2.60 was seen, in
    two clean-clone CI runs, to leave this long-lived driver without the GCS's "actor alive" message for the
    next Train controller it created, so `run.remote()` was never delivered and the job waited for ever."""
    import ray

    from jobs.spec import parse_spec

    parsed = parse_spec(spec)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "VQTRAIN_HOME": tempfile.mkdtemp(prefix="vqtrain-home-")}  # Ray Train's run folder goes there
    cmd = [sys.executable, "-m", "jobs.run", "--spec-json", json.dumps(spec)] + (["--job-id", job_id] if job_id else [])
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert p.returncode == 0, f"job failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    results = [json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("VQTRAIN_RESULT ")]
    assert len(results) == 1, p.stdout[-2000:]
    return JobRun(parsed, results[0], p.stdout)


JOB_TIMEOUT_S = 900  # a tiny job takes ~1-2 min on two shared cores; a hang fails the test instead of CI


KILL_AT_STEP = 15


@dataclass(frozen=True)
class KilledJob:
    job: JobRun
    job_id: str
    marker: Path  # written by the worker that killed itself


@pytest.fixture(scope="session")
def killed_tokenizer_job(
    ray_session: None, mlflow_url: str, cifar_s3: S3Shards, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KilledJob]:
    """The tiny tokenizer job from S3 shards, registered under its name@candidate, whose rank-1 worker
    process dies (os._exit) before step 15 once. The kill waits 3 s so that Ray Train has registered the
    step-10 checkpoint (it collects reports at its 2 s worker polls)."""
    marker = tmp_path_factory.mktemp("kill") / "killed"
    hooks = {"VQTRAIN_TEST_KILL_AT_STEP": str(KILL_AT_STEP), "VQTRAIN_TEST_KILL_MARKER": str(marker),
             "VQTRAIN_TEST_KILL_DELAY_S": "3"}
    saved = {k: os.environ.get(k) for k in hooks}
    os.environ.update(hooks)  # read by the driver (jobs.testhooks.test_hooks_from_env), passed to the workers
    job_id = f"tok-kill-{uuid.uuid4().hex[:8]}"
    try:
        job = run_spec(tiny_tokenizer_spec(cifar_s3), mlflow_url, job_id=job_id)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield KilledJob(job, job_id, marker)


@pytest.fixture(scope="session")
def registered_tokenizer(killed_tokenizer_job: KilledJob) -> JobRun:
    return killed_tokenizer_job.job
