"""Secrets never travel in a spec and never leak (docs/SECURITY.md, "Secrets"): the real API refuses every
credential with a 422 naming its field and stores nothing, so no planted value reaches the store file or a
response; older rows are shown redacted; the store, state and Ray token files are 0600; the service's own
API tokens reach no process it starts, and no job."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from service import embedded, store
from service.ray_client import RayJobs
from tests.jobs.test_credentials import CASES, PLANTED
from tests.service.conftest import READER
from vqbase import local


@pytest.fixture
def api(live, make_settings):
    return live(make_settings(max_active_jobs=0))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _store_bytes(api) -> bytes:
    db = Path(api.settings.resolved_store_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_the_api_refuses_every_credential_and_stores_nothing(api):
    with api.client() as c:
        for spec, loc in CASES:
            r = c.post("/v1/jobs", json=spec)
            assert r.status_code == 422, (loc, r.text)
            assert loc in [e["loc"] for e in r.json()["detail"]], r.text
            assert PLANTED not in r.text
        spec, loc = CASES[3]  # the same as YAML text
        r = c.post("/v1/jobs", content=yaml.safe_dump(spec), headers={"Content-Type": "application/yaml"})
        assert r.status_code == 422 and loc in r.text and PLANTED not in r.text
        listed = c.get("/v1/jobs")
        assert listed.json()["total"] == 0 and PLANTED not in listed.text
    assert PLANTED.encode() not in _store_bytes(api)
    db = Path(api.settings.resolved_store_url.removeprefix("sqlite:///"))
    for path in db.parent.glob(db.name + "*"):  # service.db and its -wal / -shm files
        assert _mode(path) == 0o600, path


def test_a_row_stored_before_the_rule_is_shown_redacted(api):
    """Specs with credentials could be stored by older versions: every response masks them."""
    spec = {"kind": "tokenizer", "name": "old", "data": {
        "train": "s3://AKIAPLANTED000000009:PLANTED@b/x", "storage_options": {
            "endpoint_url": "http://u:PLANTED@minio:9000", "secret": "PLANTED", "passwd": 42,
            "client_kwargs": {"headers": {"Authorization": "Bearer PLANTED"}}}}}  # fmt: skip
    engine = store.make_engine(api.settings.resolved_store_url)
    with store.session_factory(engine)() as db:
        db.add(store.Job(id="vq-legacy", name="old", kind="tokenizer", spec=spec))
        db.commit()
    engine.dispose()
    with api.client(token=READER) as c:
        one = c.get("/v1/jobs/vq-legacy")
        assert one.status_code == 200 and PLANTED not in one.text and '"passwd":42' not in one.text.replace(" ", "")
        assert one.json()["spec"]["data"]["storage_options"]["endpoint_url"] == "http://***@minio:9000"
        assert PLANTED not in c.get("/v1/jobs").text


def test_a_row_stored_before_the_rule_is_failed_not_sent_to_ray(live, make_settings, backends):
    """Dispatch refuses it too: its credentials would reach Ray's job info and logs."""
    server = live(make_settings(max_active_jobs=1))
    spec = {"kind": "tokenizer", "name": "old", "data": {"train": "s3://b/x", "storage_options": {"secret": PLANTED}}}
    engine = store.make_engine(server.settings.resolved_store_url)
    with store.session_factory(engine)() as db:
        db.add(store.Job(id="vq-legacy-run", name="old", kind="tokenizer", spec=spec))
        db.commit()
    engine.dispose()
    from tests.service.conftest import wait_for

    with server.client() as c:
        c.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"})  # any request: wakes dispatch
        with pytest.raises(AssertionError, match="carries credentials"):
            wait_for(c, "vq-legacy-run", ("succeeded",), timeout=60)
        assert c.get("/v1/jobs/vq-legacy-run").json()["ray_status"] is None  # never submitted
    assert not [j for j in RayJobs(backends.ray_address)._call("list_jobs") if j.submission_id == "vq-legacy-run"]


def test_state_token_and_store_files_are_private(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    embedded._ensure_ray_token()  # none yet: created 0600
    assert _mode(token) == 0o600 and len(token.read_text()) == 64
    token.chmod(0o644)  # an existing one readable by others is made private before it is used
    embedded._ensure_ray_token()
    assert _mode(token) == 0o600

    local.write_state(tmp_path / "ray.json", {"pid": 1})
    local.write_private(tmp_path / "service.json", "{}")
    assert _mode(tmp_path / "ray.json") == _mode(tmp_path / "service.json") == 0o600
    monkeypatch.setenv("VQTRAIN_HOME", str(tmp_path / "home"))
    assert _mode(local.vqtrain_home()) == 0o700

    old = tmp_path / "old.db"
    old.write_text("")
    old.chmod(0o644)
    for path in (tmp_path / "new.db", old):
        store.make_engine(f"sqlite:///{path}").dispose()
        assert _mode(path) == 0o600, path


def test_private_file_refuses_what_it_cannot_fix(tmp_path, monkeypatch):
    path = tmp_path / "auth_token"
    path.write_text("t")
    path.chmod(0o644)

    def denied(*args, **kwargs):
        raise PermissionError("not the owner")

    monkeypatch.setattr(local.os, "chmod", denied)
    with pytest.raises(PermissionError, match="chmod 600"):
        local.private_file(path)


class _Started(Exception):
    pass


def test_no_child_of_the_service_inherits_its_tokens(tmp_path, monkeypatch):
    """The Ray head (so raylet, dashboard agent and every job driver) and the MLflow server start without
    VQTRAIN_TOKENS / VQTRAIN_TOKEN; the job's runtime_env never carries them either."""
    monkeypatch.setenv("VQTRAIN_TOKENS", json.dumps([{"name": "a", "token": "PLANTED-api-token"}]))
    monkeypatch.setenv("VQTRAIN_TOKEN", "PLANTED-client-token")
    monkeypatch.setenv("HOME", str(tmp_path))
    envs: list[dict] = []

    def popen(cmd, **kwargs):
        envs.append(kwargs["env"])
        raise _Started  # nothing is started: what matters is the environment it would have had

    with monkeypatch.context() as mp:
        mp.setattr(embedded.subprocess, "Popen", popen)
        mp.setattr(embedded, "_ray_temp_dir", lambda home: home / "ray")
        for start in (lambda: embedded.start_ray_head(tmp_path, 1), lambda: local.start_mlflow_server(tmp_path)):
            with pytest.raises(_Started):
                start()
    assert len(envs) == 2 and all(PLANTED not in json.dumps(env) for env in envs)
    assert all(env.get("HOME") == str(tmp_path) for env in envs)  # the rest of the environment is kept

    submitted: dict = {}

    class Client:
        def submit_job(self, **kwargs):
            submitted.update(kwargs)

    ray = RayJobs("http://127.0.0.1:1")
    ray._client = Client()
    ray.submit("vq-1", "true", {"VQTRAIN_TOKENS": "PLANTED", "A": "1"}, {"env_vars": {"VQTRAIN_TOKEN": "PLANTED"}})
    assert submitted["runtime_env"]["env_vars"] == {"A": "1"}


def test_vqtrain_run_does_not_pass_the_client_token_to_its_job(tmp_path, monkeypatch):
    """`vqtrain run`'s child (`python -m jobs.run`) gets the caller's environment without the API tokens."""
    from service.cli import run as cli_run

    seen: dict = {}

    def run_child(cmd, env, log_path, name, verbose):
        seen.update(env)
        return 0, {}

    spec = tmp_path / "job.yaml"
    spec.write_text("kind: tokenizer\nname: t\ndata: {train: s3://b/x}\n")
    monkeypatch.setenv("VQTRAIN_TOKEN", "PLANTED")
    monkeypatch.setenv("VQTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.delenv("VQTRAIN_RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cli_run, "run_child", run_child)
    monkeypatch.setattr(cli_run, "print_result", lambda result, **kw: None)
    cli_run.run(spec)
    assert seen and "VQTRAIN_TOKEN" not in seen and seen["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"


def test_a_process_started_without_the_tokens_has_none_in_proc_environ(monkeypatch):
    """The real thing, on a cheap child: /proc/<pid>/environ of a process given `without_service_secrets`."""
    monkeypatch.setenv("VQTRAIN_TOKENS", "PLANTED")
    proc = subprocess.Popen(["sleep", "5"], env=local.without_service_secrets(dict(os.environ)))
    try:
        deadline = time.monotonic() + 10
        while not (environ := Path(f"/proc/{proc.pid}/environ").read_bytes()) and time.monotonic() < deadline:
            time.sleep(0.05)  # empty until the child has exec'd
        assert b"VQTRAIN_TOKENS" not in environ and b"PATH=" in environ
    finally:
        proc.kill()
        proc.wait()
