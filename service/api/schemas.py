"""Request and response bodies of the HTTP API (what `/openapi.json` documents)."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field


def _utc(value: dt.datetime) -> dt.datetime:
    # the store keeps naive UTC (SQLite has no zones): say so, so clients never read it as local time
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


UtcDatetime = Annotated[dt.datetime, AfterValidator(_utc)]


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobKind(StrEnum):
    tokenizer = "tokenizer"
    maskgit = "maskgit"
    tokenize = "tokenize"
    eval = "eval"


class FieldErrorOut(BaseModel):
    loc: str = Field(description="field path in the spec, e.g. data.train or quantizer.beta")
    msg: str


class SpecErrorResponse(BaseModel):
    detail: list[FieldErrorOut]


class ErrorResponse(BaseModel):
    detail: str


class Progress(BaseModel):
    step: int | None = None
    total: int | None = None
    fraction: float | None = None


class JobCreated(BaseModel):
    id: str
    state: JobState
    name: str
    kind: JobKind
    created_at: UtcDatetime
    created: bool = Field(True, description="false when an Idempotency-Key matched an earlier submission")


class JobSummary(BaseModel):
    id: str
    name: str
    kind: JobKind
    state: JobState
    created_at: UtcDatetime
    updated_at: UtcDatetime
    progress: Progress


class JobDetail(JobSummary):
    started_at: UtcDatetime | None = None
    ended_at: UtcDatetime | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="latest metrics from the job")
    images_per_s: float | None = None
    eta_seconds: float | None = None
    run_id: str | None = None
    run_url: str | None = Field(None, description="the job's MLflow run page")
    model_uri: str | None = Field(None, description="registered model, models:/name@alias")
    output: str | None = Field(None, description="tokenize jobs: where the token shards went")
    failure_reason: str | None = None
    ray_job_id: str
    ray_status: str | None = None
    cancel_requested: bool = False
    spec: dict[str, Any] = Field(description="the validated spec (credentials redacted)")


class JobList(BaseModel):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int


class JobLogs(BaseModel):
    id: str
    state: JobState
    lines: list[str]
    next_offset: int = Field(description="pass as ?offset= to get only newer lines")


class ModelVersionOut(BaseModel):
    version: str
    run_id: str | None = None
    status: str | None = None
    created_at: int | None = Field(None, description="ms since the epoch")
    aliases: list[str] = Field(default_factory=list)
    kind: str | None = None
    uri: str
    url: str | None = None


class RegisteredModelOut(BaseModel):
    name: str
    description: str | None = None
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> version")
    latest_version: str | None = None
    versions: list[ModelVersionOut]
    url: str | None = None


class ModelList(BaseModel):
    tracking_uri: str
    models: list[RegisteredModelOut]


class Health(BaseModel):
    status: str = "ok"
