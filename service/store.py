"""The job store (SQLAlchemy; SQLite by default): every accepted submission, its state and what the
service last learned about it from Ray. Store functions take a Session, like the FastAPI template."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)
    state: Mapped[str] = mapped_column(String(20), index=True, default="queued")
    spec: Mapped[dict] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(100), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    submitted: Mapped[bool] = mapped_column(Boolean, default=False, index=True)  # handed to Ray
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    total: Mapped[int | None] = mapped_column(Integer, default=None)
    metrics: Mapped[dict | None] = mapped_column(JSON, default=None)
    images_per_s: Mapped[float | None] = mapped_column(Float, default=None)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    origin_step: Mapped[int | None] = mapped_column(Integer, default=None)  # first progress seen (ETA)
    origin_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    output: Mapped[str | None] = mapped_column(Text, default=None)
    run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    run_url: Mapped[str | None] = mapped_column(Text, default=None)
    model_uri: Mapped[str | None] = mapped_column(Text, default=None)
    failure_reason: Mapped[str | None] = mapped_column(Text, default=None)
    ray_status: Mapped[str | None] = mapped_column(String(20), default=None)


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file 0600 (or make an existing one so): it holds every job's spec. SQLite gives its
    -wal and -shm files the database file's mode."""
    import os
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from service.embedded import private_file

    path = make_url(url).database
    if path and path != ":memory:" and not path.startswith("file:"):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        private_file(Path(path))


def make_engine(url: str) -> Engine:
    """An engine whose SQLite connections tolerate concurrent writers (WAL, busy timeout); a SQLite file 0600."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def new_job_id() -> str:
    return f"vq-{uuid.uuid4().hex[:16]}"


def create_job(
    db: Session,
    spec: dict,
    name: str,
    kind: str,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key already used, return that job instead (created=False)."""
    if idempotency_key:
        found = find_by_key(db, idempotency_key)
        if found is not None:
            return found, False
    job = Job(id=new_job_id(), name=name, kind=kind, spec=spec, owner=owner, idempotency_key=idempotency_key)
    db.add(job)
    try:
        db.commit()
    except IntegrityError:  # the same key raced in from another request
        db.rollback()
        found = find_by_key(db, idempotency_key)
        if found is None:
            raise
        return found, False
    return job, True


def find_by_key(db: Session, idempotency_key: str) -> Job | None:
    return db.scalar(select(Job).where(Job.idempotency_key == idempotency_key))


def get_job(db: Session, job_id: str) -> Job | None:
    return db.get(Job, job_id)


def list_jobs(
    db: Session, state: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[Job], int]:
    query = select(Job)
    if state:
        query = query.where(Job.state == state)
    if kind:
        query = query.where(Job.kind == kind)
    total = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(rows), total


def queued_unsubmitted(db: Session, limit: int) -> list[Job]:
    query = select(Job).where(Job.state == "queued", Job.submitted.is_(False)).order_by(Job.created_at)
    return list(db.scalars(query.limit(limit)).all())


def active_submitted(db: Session) -> list[Job]:
    return list(db.scalars(select(Job).where(Job.state.in_(ACTIVE), Job.submitted.is_(True))).all())


STOP_PENDING = "STOP_PENDING"  # ray_status of a job cancelled while it was being submitted, not yet stopped


def pending_stops(db: Session) -> list[Job]:
    """Jobs whose stop has yet to reach Ray (kept in the store so a service restart cannot lose them)."""
    return list(db.scalars(select(Job).where(Job.ray_status == STOP_PENDING)).all())


def count_active_submitted(db: Session) -> int:
    return db.scalar(select(func.count()).where(Job.state.in_(ACTIVE), Job.submitted.is_(True))) or 0


def mark_submitted(db: Session, job_id: str) -> bool:
    """Record the hand-over to Ray, unless the job was cancelled meanwhile (then False)."""
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued", Job.cancel_requested.is_(False))
        .values(submitted=True, updated_at=utcnow())
    )
    db.commit()
    return res.rowcount == 1


def cancel_unsubmitted(db: Session, job_id: str) -> bool:
    """Cancel a job Ray has not seen yet, atomically against the dispatcher (True if it was)."""
    now = utcnow()
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued", Job.submitted.is_(False))
        .values(state="cancelled", cancel_requested=True, ended_at=now, updated_at=now)
    )
    db.commit()
    return res.rowcount == 1


def update_job(db: Session, job: Job, **values: Any) -> Job:
    changed = False
    for key, value in values.items():
        if getattr(job, key) != value:
            setattr(job, key, value)
            changed = True
    if changed:
        job.updated_at = utcnow()
        db.commit()
    return job


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)
