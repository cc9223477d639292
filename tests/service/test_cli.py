"""The CLI against a live API (`VQTRAIN_URL`): submit, status, logs, cancel, models, error paths; and
`vqtrain run`'s handling of the job's output stream."""

from __future__ import annotations

import json
import sys

import pytest
import typer
from typer.testing import CliRunner

from service.cli import app as cli
from service.cli import common
from tests.service.conftest import ADMIN

runner = CliRunner()


@pytest.fixture
def api(live, make_settings):
    return live(make_settings(max_active_jobs=0))


@pytest.fixture
def env(api, tmp_path):
    return {"VQTRAIN_URL": api.url, "VQTRAIN_TOKEN": ADMIN, "VQTRAIN_HOME": str(tmp_path / "cli-home")}


def write_spec(path, train: str) -> None:
    path.write_text(f"kind: tokenizer\nname: cli-job\ndata:\n  train: {train}\noptim:\n  steps: 10\n")


def test_submit_status_logs_cancel(env, tmp_path):
    spec = tmp_path / "job.yaml"
    write_spec(spec, "shards/manifest.json")  # relative to the spec file; the CLI sends it absolute
    out = runner.invoke(cli, ["submit", str(spec)], env=env)
    assert out.exit_code == 0, out.output
    job_id, state = out.stdout.split()
    assert job_id.startswith("vq-") and state == "queued"

    out = runner.invoke(cli, ["status"], env=env)
    assert out.exit_code == 0 and job_id in out.stdout and "(1 of 1)" in out.stdout
    out = runner.invoke(cli, ["status", job_id, "--json"], env=env)
    detail = json.loads(out.stdout)
    assert detail["spec"]["data"]["train"] == str(tmp_path / "shards/manifest.json")
    out = runner.invoke(cli, ["logs", job_id], env=env)
    assert out.exit_code == 0 and out.stdout == ""
    out = runner.invoke(cli, ["cancel", job_id], env=env)
    assert out.exit_code == 0 and out.stdout.strip() == f"{job_id} cancelled"
    out = runner.invoke(cli, ["status", "--state", "cancelled"], env=env)
    assert job_id in out.stdout
    out = runner.invoke(cli, ["models"], env=env)
    assert out.exit_code == 0 and out.stdout.startswith("MLflow: http://127.0.0.1:")


def test_submit_follow_shows_progress_until_the_job_ends(env, tmp_path, api):
    """`submit --follow` polls the job (retrying through outages) and exits 1 when it ends cancelled."""
    import threading
    import time

    import httpx

    spec = tmp_path / "job.yaml"
    write_spec(spec, "shards/manifest.json")
    headers = {"Authorization": f"Bearer {ADMIN}"}

    def cancel_when_stored() -> None:
        for _ in range(100):
            items = httpx.get(f"{api.url}/v1/jobs", headers=headers).json()["items"]
            if items:
                httpx.post(f"{api.url}/v1/jobs/{items[0]['id']}/cancel", headers=headers)
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_when_stored)
    canceller.start()
    out = runner.invoke(cli, ["submit", str(spec), "--follow"], env=env)
    canceller.join()
    assert out.exit_code == 1, out.output
    assert "state  cancelled" in out.stdout


def test_requests_retry_while_the_service_is_unreachable(monkeypatch):
    from service.cli import client as cli_api

    calls = []
    real = cli_api.httpx.request

    def flaky(method, url, **kwargs):
        calls.append(url)
        if len(calls) < 3:
            raise cli_api.httpx.ConnectError("connection refused")
        return real(method, url, **kwargs)

    monkeypatch.setattr(cli_api, "RETRY_PAUSE", 0.01)
    monkeypatch.setattr(cli_api.httpx, "request", flaky)
    dead = cli_api.Api("http://127.0.0.1:9", None)  # nothing listens on the discard port
    with pytest.raises(typer.Exit) as e:
        cli_api.request("GET", "/healthz", api=dead)  # no retry_for: fails at once
    assert len(calls) == 1 and e.value.exit_code == 1
    calls.clear()
    with pytest.raises(typer.Exit):
        cli_api.request("GET", "/healthz", api=dead, retry_for=0.5)  # retried, then gives up
    assert len(calls) >= 3


def test_submit_errors(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: tokenizer\nname: x\ndata: {train: 'pipe:ls'}\n")
    out = runner.invoke(cli, ["submit", str(bad)], env=env)  # refused locally, before any request
    assert out.exit_code == 2 and "data.train" in out.stderr
    outside = tmp_path / "outside.yaml"
    write_spec(outside, "/etc/shards")
    out = runner.invoke(cli, ["submit", str(outside)], env=env)  # refused by the service (allowed roots)
    assert out.exit_code == 2 and "data.train" in out.stderr and "allowed roots" in out.stderr
    out = runner.invoke(cli, ["status"], env=env | {"VQTRAIN_TOKEN": "wrong"})
    assert out.exit_code == 1 and "401" in out.stderr
    out = runner.invoke(cli, ["status", "vq-nope"], env=env)
    assert out.exit_code == 1 and "404" in out.stderr


def test_without_a_service(tmp_path):
    env = {"VQTRAIN_URL": "", "VQTRAIN_HOME": str(tmp_path)}
    out = runner.invoke(cli, ["status"], env=env)
    assert out.exit_code == 2 and "vqtrain serve" in out.stderr


def test_run_refuses_a_jobs_api_address_instead_of_silently_running_locally(tmp_path):
    spec = tmp_path / "job.yaml"
    write_spec(spec, str(tmp_path / "shards"))
    env = {"VQTRAIN_HOME": str(tmp_path), "VQTRAIN_RAY_ADDRESS": "http://head:8265"}
    out = runner.invoke(cli, ["run", str(spec)], env=env)
    assert out.exit_code == 2 and "Jobs API" in out.stderr and "vqtrain serve" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_run_refuses_an_invalid_spec_before_starting_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: tokenizer\nname: x\ndata: {train: /d}\noptim: {steps: 0}\nquantizer: {beta: 3}\n")
    out = runner.invoke(cli, ["run", str(bad)], env={"VQTRAIN_HOME": str(tmp_path)})
    assert out.exit_code == 2 and "optim.steps" in out.stderr and "quantizer.beta" in out.stderr
    assert not (tmp_path / "mlflow.json").exists()  # no MLflow was started for it


def test_run_turns_progress_lines_into_a_result(tmp_path):
    """`vqtrain run`'s stream handling, on a child that prints what `python -m jobs.run` prints."""
    lines = [
        'VQTRAIN_PROGRESS {"step": 1, "total": 2, "metrics": {"loss/total": 0.5}, "images_per_s": 10.0}',
        "(RayTrainWorker pid=1) chatter",
        'VQTRAIN_PROGRESS {"step": 2, "total": 2, "metrics": {"loss/total": 0.25}, "images_per_s": 12.0}',
        'VQTRAIN_RESULT {"run_url": "http://m/#/experiments/1/runs/r", "model_uri": "models:/t@latest"}',
    ]
    code = f"print({chr(10).join(lines)!r})"
    log = tmp_path / "run.log"
    rc, result = common.run_child([sys.executable, "-c", code], {}, log, "t", verbose=False)
    assert rc == 0 and result["model_uri"] == "models:/t@latest"
    assert log.read_text().splitlines() == lines
    rc, _ = common.run_child([sys.executable, "-c", "raise SystemExit(3)"], {}, log, "t", verbose=False)
    assert rc == 3


def test_run_says_why_a_metric_was_not_computed(capsys):
    from service.cli.run import print_result

    reasons = {"rfid": "no evaluation.fid_weights named", "lpips": "no evaluation.lpips_weights named"}
    print_result({"metrics": {"psnr": 21.5, "ssim": None, "rfid": None, "lpips": None}, "not_computed": reasons})
    out = capsys.readouterr().out
    assert "psnr                   21.5" in out
    assert "rfid                   not computed (no evaluation.fid_weights named)" in out
    assert "lpips                  not computed (no evaluation.lpips_weights named)" in out
    assert "ssim                   not computed\n" in out  # no reason known: none invented
    print_result({"metrics": {"psnr": None, "rfid": None}, "not_computed": reasons}, has_eval=False)
    out = capsys.readouterr().out
    assert "psnr                   not computed (the spec names no data.eval)" in out
    assert "rfid                   not computed (no evaluation.fid_weights named)" in out
