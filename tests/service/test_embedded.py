"""Embedded servers: reuse of running ones through the state files, and clear start-up errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from service import embedded
from vqbase import local


def test_ensure_reuses_recorded_servers(backends, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.json").write_text(json.dumps({"pid": 1, "url": backends.mlflow_uri}))
    t0 = time.monotonic()
    assert local.ensure_mlflow(home) == backends.mlflow_uri
    assert time.monotonic() - t0 < 5  # reused, not started
    assert embedded.ensure_ray("http://ray-head:8265", home) == "http://ray-head:8265"  # configured wins


def test_ensure_ray_reuses_a_live_head(backends, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for its pid
    try:
        (home / "ray.json").write_text(json.dumps({"pid": proc.pid, "address": backends.ray_address}))
        assert embedded.ensure_ray(None, home) == backends.ray_address
    finally:
        proc.kill()
        proc.wait()


def test_start_failure_shows_the_log_tail(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('port already in use'); raise SystemExit(3)"],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    with pytest.raises(RuntimeError, match="exited with code 3(.|\n)*port already in use"):
        local.wait_http(f"http://127.0.0.1:{local.free_port()}/health", proc, log, "test server", 30)


def test_start_timeout_shows_the_log_tail(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("still loading plugins\n")
    with pytest.raises(TimeoutError, match="did not answer(.|\n)*still loading plugins"):
        local.wait_http(f"http://127.0.0.1:{local.free_port()}/health", None, log, "test server", 1)


def test_free_ports_are_distinct():
    ports = local.free_ports(8)
    assert len(set(ports)) == 8


def test_ray_auth_headers_follow_ray_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert embedded.ray_auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("fromfile\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert embedded.ray_auth_headers() == {"Authorization": "Bearer fromfile"}
