"""The vqtrain HTTP API (FastAPI): submit, watch, cancel and list jobs, list registered models.

`create_app(settings)` builds an app; `uvicorn --factory service.api.app:create_app` serves one from the
environment. With no Ray address or MLflow URI configured, it starts the embedded local ones.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import embedded, store
from service.api.routers import jobs as jobs_router
from service.api.routers import models as models_router
from service.api.schemas import Health
from service.manager import JobManager
from service.ray_client import RayJobs, RayUnavailable
from service.settings import Settings
from vqbase.local import ensure_mlflow

log = logging.getLogger("vqtrain.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.home.mkdir(parents=True, exist_ok=True)
        if not settings.tokens:
            log.warning("no API tokens configured (VQTRAIN_TOKENS): every request will get 401")
        ray_address = settings.ray_address or embedded.ensure_ray(None, settings.home)
        mlflow_uri = settings.mlflow_uri or ensure_mlflow(settings.home)
        engine = store.make_engine(settings.resolved_store_url)
        sessions = store.session_factory(engine)
        manager = JobManager(settings, sessions, RayJobs(ray_address), mlflow_uri)
        # what `service.api.deps` hands the routes
        app.state.settings, app.state.sessions, app.state.manager = settings, sessions, manager
        app.state.ray_address, app.state.mlflow_uri = ray_address, mlflow_uri
        try:
            manager.reconcile_all()  # catch up with whatever Ray did while no service was watching
        except Exception as e:
            log.warning("initial reconcile failed (will retry): %s", e)
        manager.start()
        try:
            yield
        finally:
            manager.stop()
            engine.dispose()

    app = FastAPI(
        title="vqtrain",
        version="0.1.0",
        summary="Train discrete image tokenizers on Ray: submit job specs, watch them, pull models.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # one shape for every 422 (a spec's errors too): `loc` a dotted path such as `header.idempotency-key`
        errors = [{"loc": ".".join(str(p) for p in e["loc"]), "msg": str(e["msg"])[:500], "type": e["type"]}
                  for e in exc.errors()[:50]]  # fmt: skip
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(RayUnavailable)
    async def _ray_down(_: Request, exc: RayUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"Ray is unavailable: {exc}"}, status_code=503)

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """Liveness; needs no token."""
        return Health()

    app.include_router(jobs_router.router)
    app.include_router(models_router.router)
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generated()  # FastAPI's, cached on the app: add the spec's schemas once
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(jobs_router.spec_components())
        if "ValidationError" in schemas:  # FastAPI's own 422 body, as `_bad_request` writes it
            schemas["ValidationError"]["properties"]["loc"] = {"type": "string", "title": "Loc",
                                                               "description": "e.g. query.limit, header.idempotency-key"}  # fmt: skip
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
