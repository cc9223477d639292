"""`vqtrain eval` against a real MLflow server and S3: the registered tokenizer of the session's job is
judged in one process (`--local`) and on Ray with two workers (the same numbers), and its model card
(tags, description) gains the evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests import weights
from tests.jobs.conftest import JobRun, S3Shards, run_spec

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("weights")
    return {"fid": weights.inception_file(folder / "inception.pth"), "lpips": weights.lpips_files(folder)}


def cli(args: list[str], mlflow_url: str, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "VQTRAIN_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def local_eval(registered_tokenizer: JobRun, cifar_s3: S3Shards, mlflow_url: str, weight_files: dict,
               node_credentials: dict, tmp_path_factory) -> dict:
    uri = registered_tokenizer.result["model_uri"]
    p = cli(["eval", uri, "--data", cifar_s3.eval, "--local", "--json", "--fid-weights", str(weight_files["fid"]),
             *sum((["--lpips-weights", str(f)] for f in weight_files["lpips"]), [])],
            mlflow_url, tmp_path_factory.mktemp("home"))
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_vqtrain_eval_prints_the_fields_metrics_and_updates_the_model_card(
    local_eval: dict, registered_tokenizer: JobRun, mlflow_client_uri: str
) -> None:
    from mlflow import MlflowClient

    m = local_eval
    assert {"psnr", "ssim", "lpips", "rfid", "usage", "bits_per_image"} <= set(m)
    assert m["images"] == 30 and m["psnr"] > 5 and 0 < m["ssim"] <= 1 and m["lpips"] > 0 and m["rfid"] > 0
    assert m["bits_per_image"] == 16 * 5  # 4 x 4 codes over 32 codes
    name = registered_tokenizer.spec.model_name
    client = MlflowClient(mlflow_client_uri, registry_uri=mlflow_client_uri)
    mv = client.get_model_version_by_alias(name, "candidate")
    tags = mv.tags
    assert float(tags["eval.eval.rfid"]) == pytest.approx(m["rfid"], rel=1e-5)
    assert "Inception-v3" in tags["eval.eval.protocol"] and "LPIPS" in tags["eval.eval.protocol"]
    assert tags["vqtrain.card.kind"] == "tokenizer" and tags["vqtrain.card.grid"] == "4x4"
    assert "## Evaluations" in mv.description and "| eval |" in mv.description
    assert f'vqmodels.load_tokenizer("models:/{name}/{mv.version}")' in mv.description
    run = client.get_run(tags["eval.eval.run"])
    assert run.data.tags["vqtrain.evaluated_model"] == f"models:/{name}/{mv.version}"
    assert run.data.metrics["eval/rfid"] == pytest.approx(m["rfid"], rel=1e-9)
    assert run.info.status == "FINISHED"


def test_eval_job_on_two_ray_workers_gives_the_local_numbers(
    local_eval: dict, registered_tokenizer: JobRun, cifar_s3: S3Shards, mlflow_client_uri: str, weight_files: dict,
    ray_session: None,
) -> None:
    spec = {
        "kind": "eval", "name": f"eval-{uuid.uuid4().hex[:6]}", "evaluate": registered_tokenizer.result["model_uri"],
        "data": {"eval": cifar_s3.eval, "image_size": 16, "storage_options": cifar_s3.spec_options, "num_workers": 0},
        "evaluation": {"fid_weights": str(weight_files["fid"]),
                       "lpips_weights": [str(f) for f in weight_files["lpips"]]},
        "optim": {"batch_size": 8},  # several batches per rank
        "resources": {"workers": 2},
        "checkpoint": {"storage": f"{cifar_s3.bucket}/checkpoints"},
        "tracking": {"experiment": "tests"},
    }
    job = run_spec(spec, mlflow_client_uri)
    got = job.result["metrics"]
    for key in ("psnr", "ssim", "lpips", "rfid", "usage", "perplexity", "images"):
        assert got[key] == pytest.approx(local_eval[key], rel=1e-6), key
    assert job.result["model"].rsplit("/", 1)[1].isdigit()  # pinned to a version


def test_eval_without_weights_reports_null_and_why(
    registered_tokenizer: JobRun, cifar_s3: S3Shards, mlflow_url: str, node_credentials: dict, tmp_path
) -> None:
    from mlflow import MlflowClient

    uri = registered_tokenizer.result["model_uri"]
    p = cli(["eval", uri, "--data", cifar_s3.eval, "--local", "--json"], mlflow_url, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    assert m["rfid"] is None and m["lpips"] is None and m["psnr"] > 5
    client = MlflowClient(mlflow_url)
    runs = client.search_runs([client.get_experiment_by_name("vqtrain").experiment_id],
                              filter_string="tags.`vqtrain.kind` = 'eval'", order_by=["start_time DESC"], max_results=1)
    assert "rfid: no evaluation.fid_weights named" in runs[0].data.tags["vqtrain.eval.skipped"]
