"""Stage two with the registered tokenizer: a tokenize job (started as `python -m jobs.run`, the way the
CLI starts it) writes token shards to S3 that hold the tokenizer's codes; a MaskGIT job trains on them,
evaluates masked-token NLL on image shards tokenised on the fly, logs samples and registers itself."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.jobs.conftest import JobRun, S3Shards, run_spec

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenized(
    registered_tokenizer: JobRun, mlflow_url: str, cifar_s3: S3Shards, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Run the tokenize job through the entry point in a child process, attached to the session's Ray."""
    import ray

    spec = {
        "kind": "tokenize",
        "name": f"tokens-{uuid.uuid4().hex[:6]}",
        "tokenizer": registered_tokenizer.result["model_uri"],
        "output": f"{cifar_s3.bucket}/tokens",
        "data": {"train": cifar_s3.train, "eval": cifar_s3.eval, "image_size": 16,
                 "storage_options": cifar_s3.spec_options, "num_workers": 0},
        "optim": {"batch_size": 64},
        "resources": {"workers": 2},
        "tracking": {"experiment": "tests"},
    }
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "VQTRAIN_HOME": str(tmp_path_factory.mktemp("vqtrain-home"))}  # Ray Train's run folder goes there
    p = subprocess.run([sys.executable, "-m", "jobs.run", "--spec-json", json.dumps(spec)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    results = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("VQTRAIN_RESULT ")]
    progress = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("VQTRAIN_PROGRESS ")]
    assert len(results) == 1 and progress, p.stdout[-2000:]
    return {"result": results[0], "progress": progress, "spec": spec}


def _token_samples(url: str, storage_options: dict) -> list[tuple[bytes, int]]:
    from jobs.data.manifest import resolve_shards
    from jobs.data.tario import read_shard

    shards = resolve_shards(url, storage_options)
    out = []
    for shard in shards.urls:
        for sample in read_shard(shard, storage_options=storage_options):
            grid = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            out.append((grid.astype(np.int64).tobytes(), int(sample["cls"])))
    return out


def test_tokenize_job_writes_the_tokenizers_codes(
    tokenized: dict[str, Any], registered_tokenizer: JobRun, cifar_s3: S3Shards, mlflow_client_uri: str
) -> None:
    import vqmodels
    from jobs.data.loader import make_image_loader
    from jobs.data.manifest import load_manifest

    result = tokenized["result"]
    assert result["output"] == f"{cifar_s3.bucket}/tokens" and result["model_uri"] is None
    train = load_manifest(f"{cifar_s3.bucket}/tokens/train/manifest.json", cifar_s3.storage_options)
    assert train.kind == "tokens" and train.num_samples == 270 and len(train.shards) == 2  # one part per rank
    assert train.meta["grid"] == [4, 4] and train.meta["codebook_size"] == 32
    assert tokenized["progress"][-1]["step"] == tokenized["progress"][-1]["total"]

    # the eval split's codes are exactly what the registered tokenizer gives for those images
    tok = vqmodels.load_tokenizer(registered_tokenizer.result["model_uri"], tracking_uri=mlflow_client_uri)
    loader = make_image_loader(cifar_s3.eval, image_size=16, batch_size=64, train=False, rank=0, world_size=1,
                               num_workers=0, storage_options=cifar_s3.storage_options)
    expected = []
    with torch.no_grad():
        for batch in loader:
            keep = batch.valid
            for grid, label in zip(tok.encode(batch.images[keep]), batch.labels[keep].tolist(), strict=True):
                expected.append((grid.numpy().astype(np.int64).tobytes(), label))
    written = _token_samples(f"{cifar_s3.bucket}/tokens/eval", cifar_s3.storage_options)
    assert len(written) == 30
    assert sorted(written) == sorted(expected)


@pytest.fixture(scope="module")
def maskgit_job(tokenized: dict[str, Any], registered_tokenizer: JobRun, cifar_s3: S3Shards, mlflow_url: str,
                ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> JobRun:
    from tests import weights

    fid = weights.inception_file(tmp_path_factory.mktemp("weights") / "inception.pth")
    spec = {
        "kind": "maskgit",
        "name": f"maskgit-{uuid.uuid4().hex[:6]}",
        "tokenizer": registered_tokenizer.result["model_uri"],
        "data": {
            "train": f"{cifar_s3.bucket}/tokens/train",  # token shards
            "eval": cifar_s3.eval,  # image shards, tokenised on the fly
            "image_size": 16,
            "storage_options": cifar_s3.spec_options,
            "shuffle_buffer": 64,
            "num_workers": 0,
        },
        "model": {"dim": 32, "depth": 1, "heads": 2, "num_classes": 10},
        "optim": {"steps": 20, "batch_size": 16, "lr": 2e-3},
        "resources": {"workers": 2},
        "checkpoint": {"every": 10, "storage": f"{cifar_s3.bucket}/checkpoints"},
        "tracking": {"experiment": "tests", "eval_every": 10, "image_every": 10},
        "register": {"alias": "candidate"},
        # FID / IS of 20 class-balanced samples at the end only (random Inception weights: the numbers are
        # checked for being made, not for their size)
        "evaluation": {"fid_weights": str(fid), "num_samples": 20, "sample_steps": 2, "every_eval": False},
    }
    return run_spec(spec, mlflow_url)


def test_maskgit_job_trains_on_token_shards(maskgit_job: JobRun, mlflow_client_uri: str) -> None:
    from mlflow import MlflowClient

    import vqmodels

    job = maskgit_job
    name = job.spec.name
    assert job.result["model_uri"] == f"models:/{name}@candidate"
    client = MlflowClient(mlflow_client_uri)
    run = client.get_run(job.result["run_id"])
    nll = client.get_metric_history(run.info.run_id, "eval/nll")
    assert sorted({m.step for m in nll}) == [10, 20]  # step 20 twice: the run's and the logged model's record
    assert all(0 < m.value < 2 * math.log(32) for m in nll)
    assert 0 <= run.data.metrics["eval/accuracy"] <= 1
    assert 0 < run.data.metrics["eval/nll_vs_unigram"] < 2 and run.data.metrics["eval/unigram_entropy"] > 0
    fid = client.get_metric_history(run.info.run_id, "eval/fid")
    assert {m.step for m in fid} == {20} and fid[0].value > 0  # at the end only (every_eval: false)
    assert run.data.metrics["eval/samples"] == 20 and run.data.metrics["eval/inception_score"] >= 1
    assert "class_acc: no evaluation.classifier named" in run.data.tags["vqtrain.eval.skipped"]
    assert "guidance" in run.data.tags["vqtrain.eval.protocol.sampling"]
    mv = client.get_model_version_by_alias(name, "candidate")
    assert mv.tags["vqtrain.card.kind"] == "maskgit" and mv.tags["vqtrain.card.tokenizer"].startswith("models:/")
    assert float(mv.tags["eval.eval.fid"]) == pytest.approx(fid[0].value, rel=1e-5)
    assert "load_generator" in mv.description

    import mlflow

    pyfunc = mlflow.pyfunc.load_model(job.result["model_uri"])  # images straight from the registry
    imgs = pyfunc.predict(np.array([1, 2], dtype=np.int64), params={"output": "images", "steps": 2})
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    assert pyfunc.predict(np.array([1], dtype=np.int64), params={"steps": 2}).shape == (1, 4, 4)
    logged = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    steps = {int(p.split("+step+")[1].split("+")[0]) for p in logged if p.startswith("images/images~samples+step+")
             and p.endswith(".png")}  # key images/samples ('/' written as '~'): the untrained model, then the end
    assert {0, 20} <= steps, logged
    contexts = {[t.value for t in d.tags][0]: d.dataset for d in run.inputs.dataset_inputs}
    assert set(contexts) == {"training", "evaluation"} and json.loads(contexts["training"].profile)["num_rows"] == 270
    (output,) = run.outputs.model_outputs
    assert output.step == 20 and client.get_logged_model(output.model_id).source_run_id == run.info.run_id
    assert "class_names" in json.loads((_download(job.result["model_uri"], mlflow_client_uri) / "config.json")
                                       .read_text())["extra"]

    model = vqmodels.load(_download(job.result["model_uri"], mlflow_client_uri))
    assert type(model).__name__ == "MaskGIT" and model.config.grid_size == (4, 4)
    codes = model.generate(3, steps=4, labels=torch.tensor([0, 1, 2]))
    assert codes.shape == (3, 4, 4) and int(codes.max()) < 32


def test_vqtrain_sample_writes_pngs_per_class(maskgit_job: JobRun, mlflow_url: str, tmp_path: Path) -> None:
    from PIL import Image

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "VQTRAIN_HOME": str(tmp_path / "home")}
    uri = maskgit_job.result["model_uri"]
    p = subprocess.run([sys.executable, "-m", "service.cli", "sample", uri, "--per-class", "2", "--steps", "3",
                        "-o", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "20 images (16x16)" in p.stdout
    for label in range(10):
        files = sorted((tmp_path / "out" / str(label)).glob("*.png"))
        assert [f.name for f in files] == ["0.png", "1.png"]
        assert all(Image.open(f).size == (16, 16) for f in files)
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size[1] >= 10 * 16 * 2  # one enlarged row per class
    # the Python call gives the same images for the same seed (the tokenizer the MaskGIT recorded decodes them)
    from jobs.sample import sample_images

    a, labels = sample_images(uri, [3, 5], steps=3, tracking_uri=mlflow_url)
    b, _ = sample_images(uri, [3, 5], steps=3, tracking_uri=mlflow_url)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8 and labels == [3, 5] and (a == b).all()
    bad = subprocess.run([sys.executable, "-m", "service.cli", "sample", uri, "--labels", "12", "-o",
                          str(tmp_path / "bad")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "outside this model's classes 0..9" in bad.stderr


def test_vqtrain_eval_judges_a_maskgit(maskgit_job: JobRun, cifar_s3: S3Shards, mlflow_url: str,
                                      node_credentials: dict, tmp_path: Path) -> None:
    from tests import weights

    fid = weights.inception_file(tmp_path / "inception.pth")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "VQTRAIN_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "service.cli", "eval", maskgit_job.result["model_uri"], "--data",
                        cifar_s3.eval, "--local", "--json", "--fid-weights", str(fid), "--num", "10", "--steps", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    assert m["fid"] > 0 and m["inception_score"] >= 1 and m["samples"] == 10
    assert 0 < m["nll"] and m["unigram_entropy"] > 0 and m["class_acc"] is None


def _download(uri: str, tracking_uri: str) -> Path:
    import tempfile

    import mlflow

    from vqmodels.checkpoint import find_checkpoint

    path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(), tracking_uri=tracking_uri)
    return find_checkpoint(path, model="maskgit")
