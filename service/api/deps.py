"""Every FastAPI dependency of the API, in one place (as the FastAPI full-stack template keeps them): the
settings, the job store's sessions, the job manager, the MLflow tracking URI, and the bearer-token checks.

Routes take them as `Annotated` types (`SettingsDep`, `ManagerDep`, `Reader`, ...); only this module reads
`request.app.state`, which `service.api.app` fills when the app starts (the getters are `async`: they only
read an attribute, and need no trip through the thread pool). Every route but `/healthz` depends on
`Reader` or `Writer`; a read-only token gets 403 on routes that change state (submit, cancel).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.api.auth import Principal, match_token
from service.manager import JobManager
from service.settings import Settings

bearer = HTTPBearer(auto_error=False, description="vqtrain API token")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_sessions(request: Request) -> sessionmaker[Session]:
    """The job store's session factory (a route opens its sessions itself, and closes them before it answers)."""
    return request.app.state.sessions


async def get_manager(request: Request) -> JobManager:
    return request.app.state.manager


async def get_mlflow_uri(request: Request) -> str | None:
    """The MLflow tracking URI the service gives its jobs and reads the model registry at."""
    return request.app.state.mlflow_uri


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
ManagerDep = Annotated[JobManager, Depends(get_manager)]
MlflowUriDep = Annotated[str | None, Depends(get_mlflow_uri)]


def require_reader(
    settings: SettingsDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    entry = match_token(creds.credentials, settings.tokens)
    if entry is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid token", headers={"WWW-Authenticate": "Bearer"}
        )
    return Principal(entry.name, entry.read_only, entry.sha256, entry.admin)


def require_writer(principal: Annotated[Principal, Depends(require_reader)]) -> Principal:
    if principal.read_only:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"token {principal.name!r} is read-only")
    return principal


Reader = Annotated[Principal, Depends(require_reader)]
Writer = Annotated[Principal, Depends(require_writer)]
