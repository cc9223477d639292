"""`/v1/jobs`: submit a spec (JSON or YAML), list, read, tail logs, cancel."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from jobs.spec import (
    JobSpec,
    SpecError,
    check_allowed_roots,
    check_spec_size,
    cluster_storage_errors,
    local_paths,
    parse_spec,
    parse_text,
    redacted,
)
from service import registry, store
from service.api.deps import ManagerDep, Reader, SessionsDep, SettingsDep, Writer
from service.api.schemas import (
    ErrorResponse,
    JobCreated,
    JobDetail,
    JobKind,
    JobList,
    JobLogs,
    JobState,
    JobSummary,
    Progress,
    SpecErrorResponse,
)
from service.manager import JobManager
from service.ray_client import RayJobNotFound, RayUnavailable, capacity_errors, cluster_spread
from service.settings import Settings
from vqbase.uris import scheme_end

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_SPEC_BYTES = 1 << 20
JobId = Annotated[str, Path(max_length=40, description="job id (vq-…)")]
_AUTH = {401: {"model": ErrorResponse}}
_URL_FIELDS = ("data.train", "data.eval", "checkpoint.storage", "output", "tokenizer", "model.perceptual.weights",
               "evaluation.fid_weights", "evaluation.lpips_weights", "evaluation.classifier", "evaluation.reference_stats")


def spec_components() -> dict[str, Any]:
    """JobSpec and its sections as OpenAPI component schemas (the request body refers to them by $ref; the
    app adds them to `/openapi.json`, where pydantic's `$defs` inside a body schema would not resolve)."""
    schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"JobSpec": {k: v for k, v in schema.items() if k != "$defs"}, **schema.get("$defs", {})}


def _spec_body_schema() -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
            "application/yaml": {"schema": {"type": "string", "description": "the spec as YAML"}},
        },
    }


def _progress(job: store.Job) -> Progress:
    frac = round(job.step / job.total, 4) if job.step is not None and job.total else None
    return Progress(step=job.step, total=job.total, fraction=frac)


def summary(job: store.Job) -> JobSummary:
    return JobSummary(
        id=job.id, name=job.name, kind=JobKind(job.kind), state=JobState(job.state),
        created_at=job.created_at, updated_at=job.updated_at, progress=_progress(job),
    )  # fmt: skip


def detail(job: store.Job) -> JobDetail:
    spec = redacted(job.spec)
    return JobDetail(
        **summary(job).model_dump(), started_at=job.started_at, ended_at=job.ended_at,
        metrics=job.metrics or {}, images_per_s=job.images_per_s, eta_seconds=job.eta_seconds,
        run_id=job.run_id, run_url=job.run_url, model_uri=job.model_uri, output=job.output,
        failure_reason=job.failure_reason, ray_job_id=job.id, ray_status=job.ray_status,
        cancel_requested=job.cancel_requested, spec=spec,
    )  # fmt: skip


def _remote_scheme(url: str) -> str | None:
    """The scheme of a `scheme://...` URL, as written; None for anything else (a path, or an MLflow URI such as
    `models:/name@alias`, which the spec checks itself and no `allowed_schemes` names)."""
    end = scheme_end(url)
    return url[: end - 1] if end and url[end:].startswith("//") else None


def _service_checks(spec: JobSpec, settings: Settings, manager: JobManager) -> None:
    """What the service adds to spec validation: absolute local paths, allowed roots and schemes."""
    errors = [
        {"loc": loc, "msg": f"local path {path!r} must be absolute when submitted to the service"}
        for loc, path in local_paths(spec)
        if not path.startswith("/")
    ]
    data = spec.model_dump(mode="json")
    for loc in _URL_FIELDS:
        value: Any = data
        for part in loc.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        for url in [value] if isinstance(value, str) else list(value or []):
            scheme = _remote_scheme(url)
            if scheme and scheme.lower() not in settings.allowed_schemes:
                errors.append({"loc": loc, "msg": f"scheme {scheme!r} is not allowed by this service"})
    if errors:
        raise SpecError(errors)
    check_allowed_roots(spec, settings.allowed_roots)
    check_spec_size(spec)
    nodes = manager.ray.nodes()  # None: the State API did not answer; the job's driver checks again
    if nodes is None:
        return
    errors = [] if settings.cluster_autoscales else capacity_errors(spec.resources.model_dump(), nodes)
    if cluster_spread(nodes) or settings.cluster_autoscales:
        root = registry.artifact_root(manager.mlflow_uri, spec.tracking.experiment) if manager.mlflow_uri else None
        errors += cluster_storage_errors(spec, root, settings.shared_roots)
    if errors:
        raise SpecError(errors)


SPEC_MEDIA_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
                    "text/plain")  # fmt: skip


def _check_content_type(request: Request) -> None:
    """A spec is JSON or YAML; say so before reading a form or a file upload as one (no header: sniffed)."""
    given = request.headers.get("content-type")
    media = (given or "").split(";")[0].strip().lower()
    if given is not None and media not in SPEC_MEDIA_TYPES and not media.endswith("+json"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            f"Content-Type {media!r}: send the spec as {', '.join(SPEC_MEDIA_TYPES[:3])}")  # fmt: skip


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to be too large: from Content-Length before reading
    anything, else while streaming (the whole body is never held when it is over the limit)."""
    too_large = HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"a spec is at most {MAX_SPEC_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_SPEC_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_SPEC_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _scoped_key(token_sha256: str, key: str | None) -> str | None:
    """The stored form of an Idempotency-Key: per token (two clients may pick the same key, and token names
    need not be unique), hashed to a fixed 64 characters whatever the key's length."""
    return hashlib.sha256(f"{token_sha256}\0{key}".encode()).hexdigest() if key else None


def _create(
    settings: Settings, sessions: sessionmaker[Session], manager: JobManager, body: bytes, owner: str, key: str | None
) -> JSONResponse:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError([{"loc": "", "msg": "the request body must be UTF-8 JSON or YAML"}]) from None
    spec = parse_spec(parse_text(text, "request body"))
    stored = spec.model_dump(mode="json")
    with sessions() as db:  # a retry of an accepted job gets it, even if the cluster changed since
        seen = store.find_by_key(db, key) if key else None
    if seen is None:
        _service_checks(spec, settings, manager)
    with sessions() as db:
        job, created = store.create_job(  # keys are per token: one client cannot reach another's job
            db, stored, spec.name, spec.kind, owner=owner,
            idempotency_key=key,
        )  # fmt: skip
    if not created and job.spec != stored:
        raise HTTPException(status.HTTP_409_CONFLICT, f"this Idempotency-Key was used for another spec (job {job.id}); "
                            "use a new key for a new job")  # fmt: skip
    if created:
        manager.kick()
    out = JobCreated(id=job.id, state=JobState(job.state), name=job.name, kind=JobKind(job.kind),
                     created_at=job.created_at, created=created)  # fmt: skip
    code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return JSONResponse(out.model_dump(mode="json"), status_code=code)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobCreated,
    responses={
        200: {"model": JobCreated, "description": "Idempotency-Key seen before: that job"},
        409: {"model": ErrorResponse, "description": "Idempotency-Key seen before with another spec"},
        413: {"model": ErrorResponse},
        415: {"model": ErrorResponse, "description": "not JSON or YAML"},
        422: {"model": SpecErrorResponse, "description": "invalid spec; nothing was stored"},
        403: {"model": ErrorResponse},
        **_AUTH,
    },
    openapi_extra={"requestBody": _spec_body_schema()},
)
async def submit_job(
    principal: Writer,
    request: Request,
    settings: SettingsDep,
    sessions: SessionsDep,
    manager: ManagerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """Validate and store a job spec (JSON or YAML); the job goes to Ray as soon as there is room."""
    _check_content_type(request)
    body = await _read_body(request)
    try:
        key = _scoped_key(principal.token_sha256, idempotency_key)
        return await run_in_threadpool(_create, settings, sessions, manager, body, principal.owner, key)
    except SpecError as e:
        return JSONResponse({"detail": e.errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


@router.get("", response_model=JobList, responses=_AUTH)
def list_jobs(
    _: Reader,
    sessions: SessionsDep,
    manager: ManagerDep,
    state: JobState | None = None,
    kind: JobKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> JobList:
    """Jobs, newest first, optionally filtered by state and kind."""
    with sessions() as db:
        rows, total = store.list_jobs(
            db, state.value if state else None, kind.value if kind else None, limit, offset
        )
        try:  # reconcile what is on this page and still moving (the background loop does the rest)
            rows = [manager.refresh(db, j) if j.submitted and j.state in store.ACTIVE else j for j in rows]
        except RayUnavailable:
            pass
        return JobList(items=[summary(j) for j in rows], total=total, limit=limit, offset=offset)


def _load(db: Session, job_id: str) -> store.Job:
    job = store.get_job(db, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


@router.get("/{job_id}", response_model=JobDetail, responses={404: {"model": ErrorResponse}, **_AUTH})
def get_job(_: Reader, sessions: SessionsDep, manager: ManagerDep, job_id: JobId) -> JobDetail:
    """State, progress, latest metrics, ETA, MLflow run, registered model, failure reason."""
    with sessions() as db:
        job = _load(db, job_id)
        try:
            job = manager.refresh(db, job)
        except RayUnavailable:
            pass  # answer with what the store knows; the next reconcile catches up
        return detail(job)


@router.get(
    "/{job_id}/logs",
    response_model=JobLogs,
    responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, **_AUTH},
)
def job_logs(
    _: Reader,
    settings: SettingsDep,
    sessions: SessionsDep,
    manager: ManagerDep,
    job_id: JobId,
    tail: Annotated[int | None, Query(ge=1, le=100_000)] = None,
    offset: Annotated[int | None, Query(ge=0, le=10**9)] = None,
) -> JobLogs:
    """The job's driver log: the last `tail` lines, or every line from `offset` on (for following)."""
    with sessions() as db:
        job = _load(db, job_id)
        lines: list[str] = []
        if job.submitted:
            try:
                lines = manager.ray.logs(job.id).splitlines()
            except RayJobNotFound:  # Ray lost its job history (a restarted head): no log to give
                lines = []
        end = len(lines)
        if offset is not None:
            lines = lines[offset:]
        else:
            lines = lines[-(tail or settings.log_tail_lines) :]
        return JobLogs(id=job.id, state=JobState(job.state), lines=lines, next_offset=end)


@router.post(
    "/{job_id}/cancel",
    response_model=JobDetail,
    responses={
        404: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
        **_AUTH,
    },
)
def cancel_job(principal: Writer, sessions: SessionsDep, manager: ManagerDep, job_id: JobId) -> JobDetail:
    """Cancel a job: at once if Ray has not started it, else Ray stops it (state follows). A token cancels the
    jobs it submitted; an admin token cancels any."""
    with sessions() as db:
        job = _load(db, job_id)
        legacy = job.owner == principal.name  # rows stored before owners carried the token's fingerprint
        if not principal.admin and job.owner != principal.owner and not legacy:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"job {job_id} was submitted by another token; only "
                                "that token or an admin token may cancel it")  # fmt: skip
        job = manager.cancel(db, job)
        return detail(job)
