"""Real jobs through the service: real Ray (Jobs API), real `python -m jobs.run`, real MLflow.

One tiny tokenizer job survives a service restart, succeeds and registers a model that `vqtrain pull`
fetches and `vqmodels.load` opens; another job is cancelled while running.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service import embedded, registry
from service.cli import app as cli
from service.ray_client import RayJobs
from tests.service.conftest import ADMIN, tiny_tokenizer_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_job_survives_restart_succeeds_and_registers_a_model(live, make_settings, shards, tmp_path, backends):
    settings = make_settings(allowed_roots=[str(tmp_path), str(shards.parent)])
    server = live(settings)
    name = f"svc-tok-{int(time.time())}"
    with server.client() as c:
        job_id = c.post("/v1/jobs", json=tiny_tokenizer_spec(shards, name, tmp_path / "ckpt")).json()["id"]
        wait_for(c, job_id, ("running",), timeout=120)

    server.stop()  # the service goes away mid-job; Ray keeps running the job
    assert RayJobs(backends.ray_address).info(job_id).status in ("RUNNING", "SUCCEEDED")
    server = live(settings, port=server.port)

    with server.client() as c:
        assert job_id in [j["id"] for j in c.get("/v1/jobs").json()["items"]]  # still listed
        d = wait_for(c, job_id, ("succeeded",), timeout=300)
        assert d["model_uri"] == f"models:/{name}/1"  # no alias in the spec: the version itself
        assert d["run_url"].startswith(backends.mlflow_uri) and d["run_id"] in d["run_url"]
        assert d["progress"] == {"step": 6, "total": 6, "fraction": 1.0}
        assert "loss/total" in d["metrics"] and d["ended_at"] and d["eta_seconds"] == 0
        lines = c.get(f"/v1/jobs/{job_id}/logs", params={"tail": 5000}).json()["lines"]
        assert any(line.startswith("VQTRAIN_RESULT ") for line in lines)
        # while a job runs, the service finds its run by the job-id tag the job sets
        assert registry.find_job_run(backends.mlflow_uri, "service-tests", job_id) == (d["run_id"], d["run_url"])
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models[name]["latest_version"] == "1" and models[name]["versions"][0]["run_id"] == d["run_id"]

    env = {"VQTRAIN_URL": server.url, "VQTRAIN_TOKEN": ADMIN, "VQTRAIN_HOME": str(tmp_path / "cli-home")}
    runner = CliRunner()
    out = runner.invoke(cli, ["pull", f"{name}@latest", "-o", str(tmp_path / "pulled")], env=env)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "pulled" / "config.json").is_file()
    import vqmodels

    tok = vqmodels.load(tmp_path / "pulled")
    assert tok.config.codebook_size == 16

    out = runner.invoke(cli, ["status", job_id], env=env)
    assert out.exit_code == 0 and "succeeded" in out.stdout and f"models:/{name}/1" in out.stdout
    out = runner.invoke(cli, ["models"], env=env)
    assert out.exit_code == 0 and name in out.stdout
    _assert_node_secret_stayed_in_the_environment(server, job_id, d["run_id"], backends)


def _assert_node_secret_stayed_in_the_environment(server, job_id: str, run_id: str, backends) -> None:
    """The node's storage secret (its environment, as on a cluster) went nowhere else while a real job ran:
    not the store, the API, MLflow, any process's arguments or Ray's session logs."""
    from pathlib import Path

    from mlflow import MlflowClient

    from service import embedded
    from tests.service.conftest import NODE_SECRET

    secret = NODE_SECRET.encode()
    db = Path(server.settings.resolved_store_url.removeprefix("sqlite:///"))
    assert not any(secret in p.read_bytes() for p in db.parent.glob(db.name + "*"))
    with server.client() as c:
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/logs?tail=100000", "/v1/jobs", "/v1/models"):
            assert NODE_SECRET not in c.get(path).text, path
    run = MlflowClient(backends.mlflow_uri).get_run(run_id)
    assert NODE_SECRET not in repr(run.data.params) + repr(run.data.tags)
    assert run.data.tags["mlflow.user"] == "admin"  # "Created by": the name of the token that submitted it
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert secret not in cmdline.read_bytes(), cmdline
        except OSError:
            continue
    temp_dir = embedded._ray_temp_dir(backends.home)
    logs = [p for p in temp_dir.rglob("*") if p.is_file() and "/logs/" in str(p)]
    assert logs and not [p for p in logs if secret in p.read_bytes()]
    # and it was there to leak: Ray's own processes carry it in their environment
    environs = [Path(f"/proc/{pid}/environ") for pid in embedded._pids_mentioning(str(temp_dir))]
    assert any(secret in e.read_bytes() for e in environs if e.exists())


def test_cancel_a_running_job(live, make_settings, shards, tmp_path, backends):
    server = live(make_settings(allowed_roots=[str(tmp_path), str(shards.parent)]))
    spec = tiny_tokenizer_spec(shards, "svc-long", tmp_path / "ckpt", steps=1_000_000)
    with server.client() as c:
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        wait_for(c, job_id, ("running",), timeout=120)
        lines = c.get(f"/v1/jobs/{job_id}/logs").json()["lines"]
        assert any("Running entrypoint" in line for line in lines)  # Ray echoes the command into the log…
        assert not any("svc-long" in line for line in lines if "entrypoint" in line)  # …which carries no spec
        drivers = embedded._pids_mentioning(f"--job-id {job_id}")  # nor does /proc/<pid>/cmdline (world-readable)
        assert drivers and not any(b"svc-long" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in drivers)
        r = c.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        d = wait_for(c, job_id, ("cancelled",), timeout=60)
        assert d["ended_at"] and d["failure_reason"] == "cancelled by request"
    assert RayJobs(backends.ray_address).info(job_id).status == "STOPPED"


def test_ray_refusing_a_submission_is_told_apart_from_ray_being_away(backends):
    """A submission Ray rejects as invalid is permanent (the job fails with Ray's reason), unlike an outage."""
    import uuid

    from service.ray_client import RaySubmitRejected, RayUnavailable

    with pytest.raises(RaySubmitRejected):
        RayJobs(backends.ray_address).submit(f"vq-bad-{uuid.uuid4().hex[:6]}", "true", {}, {"pip": 123})
    with pytest.raises(RayUnavailable):
        RayJobs("http://127.0.0.1:9").submit(f"vq-x-{uuid.uuid4().hex[:6]}", "true", {}, {})
