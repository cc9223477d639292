"""What the service reads out of a job's log, and the command it hands to Ray."""

from __future__ import annotations

import json
import os
import subprocess

from service.ray_client import eta_seconds
from vqbase.protocol import entrypoint, parse_logs, spec_env


def test_parse_logs_takes_latest_progress_result_and_error():
    text = "\n".join(
        [
            "Running entrypoint for job vq-1: python -m jobs.run",
            'VQTRAIN_PROGRESS {"step": 10, "total": 100, "metrics": {"loss/total": 0.5}}',
            "(RayTrainWorker pid=7) noise VQTRAIN_PROGRESS {not json",
            'VQTRAIN_PROGRESS {"step": 20, "total": 100, "metrics": {"loss/total": 0.4}}',
            'VQTRAIN_PROGRESS {"step": 12, "total": 100, "metrics": {}}',  # restarted from a checkpoint
            'VQTRAIN_PROGRESS {"step": 30, "total": 100, "metrics": {"loss/total": 0.3}}',
            "vqtrain: job vq-1 failed: worker died",
            "vqtrain: run http://mlflow/#/experiments/1/runs/abc",
            'VQTRAIN_RESULT {"run_id": "abc", "model_uri": "models:/t@latest"}',
        ]
    )
    r = parse_logs(text)
    assert r.progress["step"] == 30 and r.first_progress["step"] == 12
    assert r.result == {"run_id": "abc", "model_uri": "models:/t@latest"}
    assert r.failure == "job vq-1 failed: worker died"
    spec_err = parse_logs("invalid job spec:\n  data.train: no shards\n  optim.steps: >= 1\nTraceback")
    assert spec_err.failure == "invalid job spec: data.train: no shards optim.steps: >= 1"
    assert parse_logs("").progress is None


def test_eta_follows_the_step_rate_of_the_timed_progress_records():
    def line(step, t):
        return "VQTRAIN_PROGRESS " + json.dumps({"step": step, "total": 100, "metrics": {}, "time": t})

    r = parse_logs("\n".join([line(1, 1000.0), line(11, 1010.0), line(21, 1020.0)]))
    assert eta_seconds(r.first_progress, r.progress) == 79.0  # 1 step/s, 79 steps to go
    # a restart from a checkpoint starts a new attempt: its rate counts, not the time lost in between
    r = parse_logs("\n".join([line(1, 1000.0), line(50, 1049.0), line(40, 2000.0), line(60, 2005.0)]))
    assert eta_seconds(r.first_progress, r.progress) == 10.0  # 4 steps/s, 40 to go
    assert eta_seconds(r.progress, r.progress) is None  # one record: no rate yet
    untimed = {"step": 20, "total": 100}
    assert eta_seconds({"step": 10, "total": 100}, untimed) is None  # old job code: the service measures
    assert eta_seconds({"step": 1, "total": 100, "time": 1.0}, {"step": 100, "total": 100, "time": 9.0}) == 0.0


def test_entrypoint_names_the_spec_variable_and_never_expands_it(tmp_path):
    """The spec stays in the environment: Ray prints the command into the job log, and every user of the node
    reads a process's arguments in /proc/<pid>/cmdline."""
    spec = {"name": "it's \"quoted\" $HOME `x`", "data": {"train": "s3://b/x"}}
    script = tmp_path / "show.py"
    script.write_text("import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['VQTRAIN_SPEC_JSON']]))\n")
    cmd = entrypoint(f"python3 {script} #", "vq-1")  # the interpreter part is quoted as one word
    assert "$" not in cmd and "{" not in cmd
    cmd = cmd.replace(f"'python3 {script} #'", f"python3 {script}")
    out = subprocess.run(cmd, shell=True, env=os.environ | spec_env(spec), capture_output=True, text=True)
    argv, env_spec = json.loads(out.stdout)
    assert argv == ["-m", "jobs.run", "--job-id", "vq-1", "--spec-env", "VQTRAIN_SPEC_JSON"]
    assert json.loads(env_spec) == spec


def test_ray_errors_are_classified_by_status_not_by_digits_in_ids():
    """'already exists' is never "not found" even when the id holds 404; a 404 status is; others mean Ray is down."""
    import pytest

    from service.ray_client import RayJobNotFound, RayJobs, RaySubmitRejected, RayUnavailable

    class Client:  # raises what ray.job_submission.JobSubmissionClient raises
        def __init__(self, message: str) -> None:
            self.message = message

        def get_job_info(self, job_id: str):
            raise RuntimeError(self.message)

    ray = RayJobs("http://127.0.0.1:1")

    class Submitting(Client):
        def submit_job(self, **kwargs):
            raise RuntimeError(self.message)

    ray._client = Submitting("Request failed with status code 400: Job with submission_id vq-1 already exists.")
    ray.submit("vq-1", "true", {}, {})  # idempotent: counts as submitted
    ray._client = Submitting("Request failed with status code 400: bad runtime_env field 'pipp'")
    with pytest.raises(RaySubmitRejected):
        ray.submit("vq-2", "true", {}, {})
    ray._client = Submitting("Request failed with status code 503: head is restarting")
    with pytest.raises(RayUnavailable):
        ray.submit("vq-3", "true", {}, {})
    cases = [
        ("Request failed with status code 400: Job with submission_id vq-a404b already exists.", RayUnavailable),
        ("Request failed with status code 404: Job vq-1 does not exist.", RayJobNotFound),
        ("Request failed with status code 500: Traceback ... line 404, in handler", RayUnavailable),
    ]
    for message, error in cases:
        ray._client = Client(message)
        with pytest.raises(error):
            ray.info("vq-1")
