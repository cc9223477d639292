"""`/v1/models`: the tokenizers (and MaskGIT models) registered in MLflow."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from service import registry
from service.api.deps import MlflowUriDep, Reader
from service.api.schemas import ErrorResponse, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "", response_model=ModelList, responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
)
def list_models(
    _: Reader,
    uri: MlflowUriDep,
    name: Annotated[str | None, Query(max_length=200, pattern=r"^[\w\-.]+$")] = None,
) -> ModelList:
    """Registered models with their versions and aliases (pull one with `vqtrain pull NAME@ALIAS`)."""
    if not uri:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no MLflow tracking URI configured")
    try:
        models = registry.call_with_deadline(registry.list_models, uri, name)
    except Exception as e:  # MLflow unreachable or erroring
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"MLflow at {uri}: {e}") from e
    return ModelList(tracking_uri=uri, models=models)
