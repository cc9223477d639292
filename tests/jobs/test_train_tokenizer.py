"""Stage one on real Ray (2 CPU workers), a real MLflow server and the moto S3 endpoint: a tiny tokenizer
job from S3 shards registers a model that loads back and reproduces the job's own evaluation; a job whose
worker dies mid-run resumes from its S3 checkpoint and ends with exactly the requested steps in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.jobs.conftest import KILL_AT_STEP, JobRun, KilledJob, S3Shards

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _progress(text: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("VQTRAIN_PROGRESS ")]


def _state(checkpoint_path: str, storage_options: dict) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=storage_options["endpoint_url"], key=storage_options["key"],
                           secret=storage_options["secret"])
    with fs.open(f"{checkpoint_path}/state.pt", "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=False)


def test_tokenizer_job_tracks_and_registers(registered_tokenizer: JobRun, mlflow_url: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    spec, result = registered_tokenizer.spec, registered_tokenizer.result
    assert result["model_uri"] == f"models:/{spec.name}@candidate"
    assert result["run_url"].startswith(f"{mlflow_url}/#/experiments/") and result["run_url"].endswith(result["run_id"])
    client = MlflowClient(mlflow_url)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.steps"] == "30" and run.data.params["model.codebook_size"] == "32"
    # the spec carries only the endpoint: the workers found the credentials in their environment
    assert run.data.params["data.storage_options.endpoint_url"] == spec.data.storage_options["endpoint_url"]
    assert not any(k.startswith("data.storage_options.") and k.endswith(("key", "secret")) for k in run.data.params)

    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss/total")})
    assert steps == list(range(1, 31))
    for key in ("vq/usage", "vq/perplexity", "vq/dead_codes", "vq/replaced", "vq/quant_error",
                "train/images_per_s", "train/skipped_samples", "train/psnr"):
        assert key in run.data.metrics, key
    eval_psnr = client.get_metric_history(run.info.run_id, "eval/psnr")
    assert {m.step for m in eval_psnr} == {15, 30}
    assert run.data.metrics["eval/images"] == 30  # the whole eval split, shared by two ranks
    assert 0 < run.data.metrics["eval/usage"] <= 1 and 1 <= run.data.metrics["eval/perplexity"] <= 32

    def files(path: str = "") -> list[str]:
        out = []
        for f in client.list_artifacts(run.info.run_id, path):
            out += files(f.path) if f.is_dir else [f.path]
        return out

    logged = files()
    for name in ("figures/usage/step_0000015.png", "figures/projection/step_0000030.png", "spec/spec.yaml",
                 "eval/final.json"):
        assert name in logged, (name, logged)
    assert any(p.startswith("images/reconstructions+step+30") for p in logged)
    logged_spec = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "spec/spec.yaml", str(tmp_path))).read_text())
    assert logged_spec["data"]["storage_options"] == {"endpoint_url": spec.data.storage_options["endpoint_url"]}
    assert logged_spec["optim"]["steps"] == 30

    version = client.get_model_version_by_alias(spec.name, "candidate")
    assert version.run_id == run.info.run_id

    progress = _progress(registered_tokenizer.progress)
    assert progress[-1]["step"] == 30 and progress[-1]["total"] == 30
    assert progress[-1]["images_per_s"] > 0 and "loss/total" in progress[-1]["metrics"]


def test_registered_tokenizer_round_trips(
    registered_tokenizer: JobRun, mlflow_client_uri: str, cifar_s3: S3Shards
) -> None:
    """The registry's tokenizer holds the job's final weights and reproduces its final eval PSNR."""
    import mlflow
    from mlflow import MlflowClient

    import vqmodels
    from jobs.data.loader import make_image_loader

    result = registered_tokenizer.result
    tok = vqmodels.load_tokenizer(result["model_uri"], tracking_uri=mlflow_client_uri)
    trained = _state(result["checkpoint"], cifar_s3.storage_options)
    assert trained["step"] == 30
    for key, value in tok.state_dict().items():
        assert torch.equal(value, trained["model"][key]), key

    loader = make_image_loader(cifar_s3.eval, image_size=16, batch_size=64, train=False, rank=0, world_size=1,
                               num_workers=0, storage_options=cifar_s3.storage_options)
    psnrs = []
    with torch.no_grad():
        for batch in loader:
            x = batch.images[batch.valid]
            codes = tok.encode(x)
            assert codes.shape == (x.shape[0], 4, 4) and 0 <= int(codes.min()) and int(codes.max()) < 32
            rec = tok.decode(codes).clamp(-1, 1)
            psnrs.append(10 * torch.log10(4.0 / (rec - x).pow(2).flatten(1).mean(1)))
    psnr = float(torch.cat(psnrs).mean())
    final_eval = MlflowClient(mlflow_client_uri).get_run(result["run_id"]).data.metrics["eval/psnr"]
    assert psnr == pytest.approx(final_eval, abs=1e-3)

    pyfunc = mlflow.pyfunc.load_model(result["model_uri"])  # the pyfunc wrapper serves the same codes
    images = ((x[:4] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    direct = tok.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    assert (pyfunc.predict(images) == direct.numpy()).all()


def test_killed_worker_resumes_in_the_same_run(killed_tokenizer_job: KilledJob, mlflow_url: str,
                                               cifar_s3: S3Shards) -> None:
    """Rank 1's process died before step 15; the job resumed from the step-10 checkpoint on S3, ran
    exactly 30 steps in total and kept one MLflow run."""
    from mlflow import MlflowClient

    job = killed_tokenizer_job.job
    assert killed_tokenizer_job.marker.read_text().startswith(f"killed rank 1 at step {KILL_AT_STEP}")
    client = MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name("tests")
    tag = f"tags.`vqtrain.job_id` = '{killed_tokenizer_job.job_id}'"
    runs = client.search_runs([exp.experiment_id], filter_string=tag)
    assert [r.info.run_id for r in runs] == [job.result["run_id"]]
    resumed = client.get_metric_history(job.result["run_id"], "train/resumed_from")
    assert [m.value for m in resumed] == [10.0]  # from the step-10 checkpoint, not from scratch

    steps = [p["step"] for p in _progress(job.progress)]
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    # Progress is throttled (one record per 0.5 s), so the restart shows in the stream only when the
    # killed attempt printed a step past the checkpoint; the metric above is the reliable witness.
    assert steps[-1] == 30 and len(restarts) <= 1, steps
    assert all(10 < steps[i] <= KILL_AT_STEP + 1 for i in restarts), steps

    state = _state(job.result["checkpoint"], cifar_s3.storage_options)
    assert state["step"] == 30
    assert int(state["model"]["quantizer.step"]) == 30  # 10 steps before the kill + 20 after, none twice
    assert job.result["model_uri"] == f"models:/{job.spec.name}@candidate"
    assert len(client.search_model_versions(f"name='{job.spec.name}'")) == 1


def test_bad_specs_fail_before_anything_runs(tmp_path: Path) -> None:
    """Exit status 2 and the field's name; no Ray, no MLflow run."""
    bad = {"kind": "tokenizer", "name": "x", "data": {"train": str(tmp_path / "none")}, "optim": {"steps": 0}}
    p = subprocess.run([sys.executable, "-m", "jobs.run", "--spec-json", json.dumps(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "optim.steps" in p.stderr
    missing = {**bad, "optim": {"steps": 5}}
    p = subprocess.run([sys.executable, "-m", "jobs.run", "--spec-json", json.dumps(missing)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "data.train" in p.stderr and "none" in p.stderr
