"""Settings from the environment; tokens are only ever kept hashed."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from service.api.auth import match_token
from service.settings import Settings, TokenEntry, hash_token


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VQTRAIN_HOME", str(tmp_path))
    monkeypatch.setenv("VQTRAIN_RAY_ADDRESS", "http://head:8265")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("VQTRAIN_ALLOWED_ROOTS", json.dumps(["/data"]))
    monkeypatch.setenv("VQTRAIN_MAX_ACTIVE_JOBS", "7")
    monkeypatch.setenv(
        "VQTRAIN_TOKENS",
        json.dumps([{"name": "ci", "token": "plain-secret"}, {"name": "ro", "sha256": hash_token("r"), "read_only": True}]),
    )
    s = Settings()
    assert s.home == tmp_path and s.ray_address == "http://head:8265" and s.mlflow_uri == "http://mlflow:5000"
    assert s.allowed_roots == ["/data"] and s.max_active_jobs == 7
    assert s.resolved_store_url == f"sqlite:///{tmp_path}/service.db"
    assert "plain-secret" not in s.model_dump_json()  # hashed on load, the plain token is not kept
    assert match_token("plain-secret", s.tokens).name == "ci"
    assert match_token("r", s.tokens).read_only is True
    assert match_token("nope", s.tokens) is None


def test_token_entries_need_a_hash():
    with pytest.raises(ValidationError):
        TokenEntry(name="x")
    with pytest.raises(ValidationError):
        TokenEntry(name="x", sha256="not-hex")


def test_allowed_roots_are_read_like_the_jobs_read_them(monkeypatch, tmp_path):
    """One parser (vqbase.protocol.parse_roots) for the service's roots and for the jobs it starts."""
    monkeypatch.setenv("VQTRAIN_HOME", str(tmp_path))
    monkeypatch.setenv("VQTRAIN_ALLOWED_ROOTS", f"/data{os.pathsep}/scratch")
    assert Settings().allowed_roots == ["/data", "/scratch"]
    monkeypatch.setenv("VQTRAIN_ALLOWED_ROOTS", '["/data", 3]')
    with pytest.raises(ValidationError, match="VQTRAIN_ALLOWED_ROOTS"):
        Settings()
    assert Settings(allowed_roots=["/x"]).allowed_roots == ["/x"]


def test_jobs_get_the_services_roots(tmp_path):
    from service.manager import JobManager
    from service.store import Job
    from vqbase.protocol import ALLOWED_ROOTS_ENV, allowed_roots_from_env

    job = Job(id="vq-1", spec={"name": "t"})
    env = JobManager(Settings(home=tmp_path, allowed_roots=["/data", "~/shards"]), None, None, None).job_env(job)
    assert allowed_roots_from_env(env) == ["/data", os.path.expanduser("~/shards")]  # absolute where the job runs
    env = JobManager(Settings(home=tmp_path), None, None, None).job_env(job)
    assert ALLOWED_ROOTS_ENV not in env  # none configured: the service refuses every local path itself
