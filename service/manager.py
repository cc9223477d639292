"""Keeps the job store and Ray in step: hands queued jobs to Ray (at most `max_active_jobs` at once),
and reconciles every active job with Ray at start, on a timer and when a client reads it.

Submission is an outbox: a job is stored first, then submitted by one background thread under its
own id as the Ray submission id, so a crash between the two is repaired by resubmitting (Ray refuses
a duplicate id) and several replicas sharing a store cannot run a job twice.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobs.credentials import credential_errors
from service import registry, store
from service.ray_client import (
    STATE_OF_RAY,
    RayJobNotFound,
    RayJobs,
    RaySubmitRejected,
    RayUnavailable,
    eta_seconds,
)
from service.settings import Settings
from vqbase.protocol import (
    ALLOWED_ROOTS_ENV,
    JOB_ID_ENV,
    SHARED_ROOTS_ENV,
    USER_ENV,
    entrypoint,
    parse_logs,
    spec_env,
)

log = logging.getLogger("vqtrain.service")
LOG_REFRESH_S = 3.0  # a running job's logs are re-read at most this often
RUN_LOOKUP_S = 10.0  # MLflow is asked for a running job's run at most this often
STOP_RETRY_S = 15.0  # a cancelled job that Ray still runs is sent another stop at most this often


def _ts(seconds: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).replace(tzinfo=None) if seconds else None


class JobManager:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], ray: RayJobs, mlflow_uri: str | None
    ):
        self.settings, self.sessions, self.ray, self.mlflow_uri = settings, sessions, ray, mlflow_uri
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dispatch_lock = threading.Lock()
        self._last_logs: dict[str, float] = {}
        self._last_run_lookup: dict[str, float] = {}
        self._run_lookups: dict[str, Any] = {}  # job id -> MLflow lookup in flight (a Future)
        self._last_stop: dict[str, float] = {}
        self._log_bytes: dict[str, int] = {}  # size of each running job's log at its last read

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vqtrain-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def kick(self) -> None:
        """Dispatch soon (after a submission or a cancel)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_all()
                self.dispatch()
            except Exception:  # the loop must survive anything; the next pass retries
                log.exception("reconcile/dispatch pass failed")
            self._wake.wait(self.settings.poll_interval)
            self._wake.clear()

    # ------------------------------------------------------------------ dispatch

    def job_env(self, job: store.Job) -> dict[str, str]:
        env = {JOB_ID_ENV: job.id, "PYTHONUNBUFFERED": "1", **self.settings.job_env, **spec_env(job.spec)}
        if job.owner:  # the run's "Created by" in MLflow: the submitting token's name (owner is name@fingerprint)
            env[USER_ENV] = job.owner.rsplit("@", 1)[0]
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        if self.settings.allowed_roots:  # the job's loaders keep local data under the roots checked here
            roots = [os.path.abspath(os.path.expanduser(r)) for r in self.settings.allowed_roots]
            env[ALLOWED_ROOTS_ENV] = json.dumps(roots)
        if self.settings.shared_roots:  # the driver repeats the cluster check (jobs.run)
            env[SHARED_ROOTS_ENV] = json.dumps(self.settings.shared_roots)
        return env

    def dispatch(self) -> int:
        """Submit queued jobs while fewer than `max_active_jobs` are on Ray; returns how many went."""
        if self.settings.max_active_jobs <= 0:
            return 0
        sent = 0
        with self._dispatch_lock, self.sessions() as db:
            room = self.settings.max_active_jobs - store.count_active_submitted(db)
            for job in store.queued_unsubmitted(db, max(room, 0)):
                leaked = credential_errors(job.spec)  # stored before specs were checked for credentials
                if leaked:
                    fields = ", ".join(e["loc"] for e in leaked)
                    store.update_job(db, job, state="failed", ended_at=store.utcnow(),
                                     failure_reason=f"the spec carries credentials ({fields}); resubmit it without "
                                     "them (see docs/SECURITY.md)")  # fmt: skip
                    continue
                command = entrypoint(self.settings.entrypoint_python, job.id)
                try:
                    self.ray.submit(job.id, command, self.job_env(job), self.settings.runtime_env)
                except RaySubmitRejected as e:  # would fail the same way forever, and hold up the queue
                    store.update_job(db, job, state="failed", ended_at=store.utcnow(),
                                     failure_reason=f"Ray refused the job: {e}"[:4000])  # fmt: skip
                    continue
                except RayUnavailable as e:
                    log.warning("job %s stays queued: %s", job.id, e)
                    break
                if not store.mark_submitted(db, job.id):  # cancelled while we were submitting
                    store.update_job(db, job, ray_status=store.STOP_PENDING)  # remembered until Ray has it
                    if self._send_stop(job.id):
                        store.update_job(db, job, ray_status="STOPPED")
                sent += 1
        return sent

    # ------------------------------------------------------------------ reconcile

    def _send_stop(self, job_id: str) -> bool:
        """Ask Ray to stop a job; False (logged) if Ray is away: the caller's record makes it try again."""
        self._last_stop[job_id] = time.monotonic()
        try:
            self.ray.stop(job_id)
        except RayUnavailable as e:
            log.warning("stop of %s not delivered yet: %s", job_id, e)
            return False
        return True

    def reconcile_all(self) -> None:
        with self.sessions() as db:
            for job in store.pending_stops(db):
                if not self._send_stop(job.id):
                    return
                store.update_job(db, job, ray_status="STOPPED")
        with self.sessions() as db:
            for job in store.active_submitted(db):
                try:
                    self.refresh(db, job)
                except RayUnavailable as e:
                    log.warning("cannot reconcile %s: %s", job.id, e)
                    return

    def refresh(self, db: Session, job: store.Job, force_logs: bool = False) -> store.Job:
        """Bring one job up to date with Ray (state, progress, result)."""
        if not job.submitted or job.state not in store.ACTIVE:
            return job
        try:
            info = self.ray.info(job.id)
        except RayJobNotFound:
            return store.update_job(
                db, job, state="failed", ended_at=store.utcnow(),
                failure_reason="Ray has no record of this job (was the cluster replaced?)",
            )  # fmt: skip
        state = STATE_OF_RAY.get(info.status, job.state)
        values: dict[str, Any] = {"state": state, "ray_status": info.status}
        now = time.monotonic()
        if job.cancel_requested and state not in store.TERMINAL and now - self._last_stop.get(job.id, 0) >= STOP_RETRY_S:
            self._send_stop(job.id)  # the cancel's own stop may not have reached Ray (it was away)
        if info.start_time and job.started_at is None and state != "queued":
            values["started_at"] = _ts(info.start_time)
        if state in store.TERMINAL:
            values["ended_at"] = _ts(info.end_time) or store.utcnow()
        # the whole log comes back each time: a long one is re-read less often (every 3 s per MB)
        every = LOG_REFRESH_S * max(1.0, self._log_bytes.get(job.id, 0) / 1e6)
        if force_logs or state in store.TERMINAL or now - self._last_logs.get(job.id, 0) >= every:
            self._last_logs[job.id] = now
            text = self.ray.logs(job.id)
            self._log_bytes[job.id] = len(text)
            values |= self._from_logs(job, text, state, info.message)
        if state == "running" and not (values.get("run_url") or job.run_url):
            values |= self._run_lookup(job)
        if state == "cancelled" and self.mlflow_uri:  # once: the job leaves the active states here
            experiment = (job.spec.get("tracking") or {}).get("experiment", "vqtrain")
            registry.submit(registry.end_cancelled_run, self.mlflow_uri, experiment, job.id)  # not waited for
        if state in store.TERMINAL:
            self._last_logs.pop(job.id, None)
            self._log_bytes.pop(job.id, None)
            self._last_run_lookup.pop(job.id, None)
            self._run_lookups.pop(job.id, None)
            self._last_stop.pop(job.id, None)
        return store.update_job(db, job, **values)

    def _from_logs(self, job: store.Job, text: str, state: str, ray_message: str | None) -> dict[str, Any]:
        report = parse_logs(text)
        values: dict[str, Any] = {}
        p = report.progress
        if p:
            step, total = p.get("step"), p.get("total")
            values |= {"step": step, "total": total, "images_per_s": p.get("images_per_s")}
            values["metrics"] = {
                k: v for k, v in (p.get("metrics") or {}).items() if isinstance(v, (int, float))
            }
            values |= self._eta(job, report.first_progress or p, p)
        result = report.result or {}
        for key in ("run_id", "run_url", "model_uri", "output"):
            if result.get(key):
                values[key] = str(result[key])
        if state == "succeeded":
            values["eta_seconds"] = 0.0
        if state == "failed":
            values["failure_reason"] = (report.failure or ray_message or "the job failed")[:4000]
        if state == "cancelled":
            values["failure_reason"] = "cancelled" + (" by request" if job.cancel_requested else " on Ray")
        return values

    def _eta(self, job: store.Job, first: dict, last: dict) -> dict[str, Any]:
        step, total = last.get("step") or 0, last.get("total") or 0
        if not total or step >= total:
            return {"eta_seconds": 0.0 if total else None}
        eta = eta_seconds(first, last)  # the job's own timestamps: the step rate of this attempt
        if eta is not None:
            return {"eta_seconds": eta}
        # no timestamps (or one record so far): rate since the service first saw this attempt progress
        if job.origin_step is None or step < job.origin_step:
            return {"origin_step": step, "origin_at": store.utcnow(), "eta_seconds": None}
        if step > job.origin_step and job.origin_at is not None:
            elapsed = (store.utcnow() - job.origin_at).total_seconds()
            rate = (step - job.origin_step) / max(elapsed, 1e-6)
            return {"eta_seconds": round((total - step) / rate, 1)}
        return {}

    def _run_lookup(self, job: store.Job) -> dict[str, Any]:
        now = time.monotonic()
        if not self.mlflow_uri or now - self._last_run_lookup.get(job.id, 0) < RUN_LOOKUP_S:
            return {}
        pending = self._run_lookups.get(job.id)
        if pending is None:  # never waited for here: an unreachable MLflow must not stall status or dispatch
            experiment = (job.spec.get("tracking") or {}).get("experiment", "vqtrain")
            self._run_lookups[job.id] = registry.submit(registry.find_job_run, self.mlflow_uri, experiment, job.id)
            return {}
        if not pending.done() or self._run_lookups.pop(job.id, None) is not pending:  # another thread took it
            return {}
        self._last_run_lookup[job.id] = now
        try:
            found = pending.result()
        except Exception as e:  # MLflow down must not break status reads
            log.warning("MLflow lookup for %s failed: %s", job.id, e)
            return {}
        return {"run_id": found[0], "run_url": found[1]} if found else {}

    # ------------------------------------------------------------------ cancel

    def cancel(self, db: Session, job: store.Job) -> store.Job:
        """Cancel: a job not yet on Ray ends at once; one on Ray is stopped and ends when Ray says so."""
        if job.state in store.TERMINAL:
            return job
        if store.cancel_unsubmitted(db, job.id):
            db.refresh(job)
            return job
        store.update_job(db, job, cancel_requested=True)  # stored first: reconcile resends the stop if Ray is away
        self._last_stop[job.id] = time.monotonic()
        self.ray.stop(job.id)
        deadline = time.monotonic() + 5.0  # Ray stops jobs asynchronously; wait briefly for the final state
        while time.monotonic() < deadline:
            job = self.refresh(db, job, force_logs=True)
            if job.state in store.TERMINAL:
                break
            time.sleep(0.25)
        return job
