"""The dispatcher's cancel path when Ray is briefly away: no stop may be lost (the store says cancelled, so
nothing else would ever stop the job on Ray). Ray is replaced by a recorder that can refuse calls, since the
point is what happens when the real one is unreachable."""

from __future__ import annotations

import pytest

from service import manager as manager_module
from service import store
from service.manager import JobManager
from service.ray_client import RayJobInfo, RaySubmitRejected, RayUnavailable
from service.settings import Settings
from tests.service.conftest import TOKENS


class FlakyRay:
    """Records submits and stops; `down` makes every call fail as an unreachable Ray would."""

    def __init__(self) -> None:
        self.down = False
        self.stops: list[str] = []
        self.submitted: list[str] = []
        self.reject: set[str] = set()
        self.on_submit = None

    def _check(self) -> None:
        if self.down:
            raise RayUnavailable("Ray Jobs API at http://127.0.0.1:1: connection refused")

    def submit(self, job_id, command, env, runtime_env) -> None:
        self._check()
        if job_id in self.reject:
            raise RaySubmitRejected("Request failed with status code 400: invalid runtime_env")
        self.submitted.append(job_id)
        if self.on_submit:
            self.on_submit(job_id)

    def stop(self, job_id: str) -> bool:
        self._check()
        self.stops.append(job_id)
        return True

    def info(self, job_id: str) -> RayJobInfo:
        self._check()
        return RayJobInfo("RUNNING", None, 1.0, None)

    def logs(self, job_id: str) -> str:
        self._check()
        return ""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(manager_module, "STOP_RETRY_S", 0.0)
    (tmp_path / "home").mkdir()
    settings = Settings(home=tmp_path / "home", ray_address="http://127.0.0.1:1", mlflow_uri="", tokens=TOKENS,
                        max_active_jobs=4)  # fmt: skip
    engine = store.make_engine(settings.resolved_store_url)
    sessions = store.session_factory(engine)
    ray = FlakyRay()
    yield JobManager(settings, sessions, ray, None), sessions, ray
    engine.dispose()


def _new_job(sessions) -> str:
    with sessions() as db:
        job, _ = store.create_job(db, {"kind": "tokenizer", "name": "x"}, "x", "tokenizer")
        return job.id


def test_a_cancel_whose_stop_missed_ray_is_resent(setup):
    manager, sessions, ray = setup
    job_id = _new_job(sessions)
    assert manager.dispatch() == 1
    ray.down = True
    with sessions() as db, pytest.raises(RayUnavailable):  # the API answers 503 …
        manager.cancel(db, store.get_job(db, job_id))
    with sessions() as db:
        assert store.get_job(db, job_id).cancel_requested  # … but the request is stored
    manager.reconcile_all()  # Ray still away: nothing to do, nothing lost
    ray.down = False
    manager.reconcile_all()
    assert ray.stops == [job_id]


def test_a_job_cancelled_while_being_submitted_is_stopped_once_ray_is_back(setup):
    manager, sessions, ray = setup
    job_id = _new_job(sessions)

    def cancel_then_lose_ray(submitted_id: str) -> None:
        with sessions() as db:
            assert store.cancel_unsubmitted(db, submitted_id)  # the user's cancel lands mid-submit
        ray.down = True

    ray.on_submit = cancel_then_lose_ray
    assert manager.dispatch() == 1  # no exception escapes the dispatcher
    with sessions() as db:
        assert store.get_job(db, job_id).state == "cancelled"
    assert ray.stops == []
    ray.down = False
    restarted = JobManager(manager.settings, sessions, ray, None)  # the pending stop is in the store
    restarted.reconcile_all()
    assert ray.stops == [job_id]
    restarted.reconcile_all()
    assert ray.stops == [job_id]  # delivered once


def test_a_hanging_mlflow_lookup_never_stalls_the_dispatcher(setup, monkeypatch):
    """A running job's run is looked up in MLflow in the background: reconcile (and so every status read and
    every dispatch) goes on while the lookup hangs, and picks the run up once it answers."""
    import threading
    import time

    from service import registry

    manager, sessions, ray = setup
    manager.mlflow_uri = "http://127.0.0.1:9"
    release = threading.Event()

    def hanging_lookup(uri: str, experiment: str, job_id: str):
        release.wait(30)
        return "run-1", f"{uri}/#/experiments/0/runs/run-1"

    monkeypatch.setattr(registry, "find_job_run", hanging_lookup)
    job_id = _new_job(sessions)
    assert manager.dispatch() == 1
    t0 = time.monotonic()
    for _ in range(3):
        manager.reconcile_all()
    assert time.monotonic() - t0 < 5
    with sessions() as db:
        assert store.get_job(db, job_id).run_url is None
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        manager.reconcile_all()
        with sessions() as db:
            if store.get_job(db, job_id).run_id == "run-1":
                break
        time.sleep(0.05)
    with sessions() as db:
        assert store.get_job(db, job_id).run_id == "run-1"


def test_a_job_ray_refuses_fails_with_the_reason_and_does_not_hold_up_the_queue(setup):
    manager, sessions, ray = setup
    bad, good = _new_job(sessions), _new_job(sessions)
    ray.reject.add(bad)
    assert manager.dispatch() == 1
    with sessions() as db:
        job = store.get_job(db, bad)
        assert job.state == "failed" and "invalid runtime_env" in job.failure_reason
    assert ray.submitted == [good]


def test_an_mlflow_call_still_retrying_does_not_hold_up_exit():
    """A lookup stuck in MLflow's retries must not keep the service (or a test run) from exiting."""
    import subprocess
    import sys
    import time

    code = "import time; from service import registry; registry.submit(time.sleep, 120); print('exiting')"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 30
