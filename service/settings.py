"""Service settings, read from the environment (`VQTRAIN_*`) by pydantic-settings.

Tokens are kept only as SHA-256 hashes: `VQTRAIN_TOKENS` is a JSON list of
`{"name": "ci", "sha256": "<hex>", "read_only": false, "admin": false}` (an admin token may cancel any
job, others only the jobs they submitted); an entry may give `"token": "<plain>"`
instead, which is hashed on load and never kept.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vqbase.local import configured_tracking_uri, home_path
from vqbase.protocol import parse_roots


def hash_token(token: str) -> str:
    """The form tokens are stored and compared in."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenEntry(BaseModel):
    name: str = "token"
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    read_only: bool = False
    admin: bool = False  # may cancel every job; other writers cancel only the jobs they submitted

    @model_validator(mode="before")
    @classmethod
    def _hash_plain(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("token"):
            data = {k: v for k, v in data.items() if k != "token"} | {"sha256": hash_token(data["token"])}
        return data

    @model_validator(mode="after")
    def _has_hash(self) -> TokenEntry:
        if not self.sha256:
            raise ValueError(f"token {self.name!r}: give sha256 (or token)")
        return self


class Settings(BaseSettings):
    """Everything the service needs to know; `vqtrain serve` fills the gaps with embedded servers."""

    model_config = SettingsConfigDict(env_prefix="VQTRAIN_", extra="ignore")

    home: Path = Field(default_factory=home_path, description="state directory ($VQTRAIN_HOME)")
    ray_address: str | None = Field(None, description="Ray Jobs API (http://head:8265) or cluster address")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI given to jobs and used for models")
    store_url: str | None = Field(None, description="SQLAlchemy URL of the job store; default SQLite in home")
    tokens: list[TokenEntry] = Field(default_factory=list)
    allowed_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="local paths a spec may use: a JSON list or paths joined by os.pathsep; jobs get them too",
    )
    shared_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="local paths every Ray node mounts (NFS, EFS, Lustre): allowed for jobs whose workers sit on "
        "other nodes; a JSON list or paths joined by os.pathsep; jobs get them too",
    )
    allowed_schemes: list[str] = Field(
        ["s3", "gs", "http", "https", "file"], description="remote data URL schemes"
    )
    max_active_jobs: int = Field(
        4, ge=0, description="jobs on Ray at once; more wait queued; 0 = dispatch paused"
    )
    cluster_autoscales: bool = Field(
        False, description="an autoscaler adds Ray nodes on demand: skip the check that the live nodes can hold "
        "a job's workers (and treat workers as remote)",
    )
    poll_interval: float = Field(2.0, gt=0, description="seconds between reconcile passes")
    entrypoint_python: str = Field(default_factory=lambda: sys.executable)
    job_env: dict[str, str] = Field(default_factory=dict, description="extra env vars for every job")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="extra Ray runtime_env for every job"
    )
    log_tail_lines: int = Field(200, ge=1)

    @field_validator("allowed_roots", "shared_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: Any) -> Any:
        return parse_roots(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fallbacks(self) -> Settings:
        self.mlflow_uri = self.mlflow_uri or configured_tracking_uri()  # VQTRAIN_MLFLOW_URI, MLFLOW_TRACKING_URI
        return self

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.home / 'service.db'}"
