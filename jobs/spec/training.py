"""How a job trains and where its results go: the `optim:`, `resources:` (Ray workers), `checkpoint:`,
`tracking:` (the MLflow experiment) and `register:` (the registered model and its alias) sections."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.spec.errors import FieldError
from jobs.spec.fields import NAME_PATTERN, StrictModel, check_urls, no_control_characters
from vqbase.protocol import HOME_ENV

ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9\-_]*$"
MAX_ALIAS_LENGTH = 255  # MLflow's limit on alias names
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")  # MLflow reserves these: models:/name@v3 means version 3


class OptimSpec(StrictModel):
    steps: int = Field(1000, ge=1, le=10**9)
    batch_size: int = Field(64, ge=1, le=65536, description="per worker")
    lr: float = Field(3.0e-4, gt=0, le=10)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=10**9)
    grad_clip: float | None = Field(1.0, gt=0, le=10**6, description="null = off")
    weight_decay: float = Field(0.0, ge=0, le=10)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimSpec:
        if self.warmup_steps > self.steps:
            raise FieldError("warmup_steps", f"must be <= steps ({self.steps}), got {self.warmup_steps}")
        return self


class ResourcesSpec(StrictModel):
    workers: int = Field(1, ge=1, le=4096)
    cpus_per_worker: float = Field(1, gt=0, le=1024)
    gpus_per_worker: float = Field(0, ge=0, le=16, description="a worker's GPUs sit on one node: at most 16")
    max_failures: int = Field(2, ge=0, le=1000, description="worker-group restarts from the last checkpoint")


class CheckpointSpec(StrictModel):
    every: int = Field(200, ge=1, le=10**9, description="steps")
    every_minutes: float | None = Field(
        5, gt=0, le=24 * 60,
        description="also checkpoint once this much wall-clock time has passed since the last one (looked at every "
        "10 steps), so a lost node costs about these minutes plus 10 steps; null = steps only",
    )
    keep: int = Field(2, ge=1, le=1000)
    storage: str | None = Field(None, description=f"local dir or s3://...; null = <{HOME_ENV}>/checkpoints")

    _url = field_validator("storage")(check_urls)


class TrackingSpec(StrictModel):
    experiment: str = Field("vqtrain", min_length=1, max_length=200)
    eval_every: int = Field(200, ge=0, le=10**9, description="steps; 0 = off")
    image_every: int = Field(200, ge=0, le=10**9, description="steps; 0 = off")
    system_metrics: bool = Field(
        True, description="CPU, memory, disk, network (and GPU, with the gpu extra) of rank 0's node as system/* "
        "metrics every 10 s"
    )

    _names = field_validator("experiment")(no_control_characters)


class RegisterSpec(StrictModel):
    model_name: str | None = Field(None, pattern=NAME_PATTERN, max_length=100, description="null = the job's name")
    alias: str | None = Field(
        None,
        pattern=ALIAS_PATTERN,
        max_length=MAX_ALIAS_LENGTH,
        description=(
            "alias moved to the registered version, e.g. 'champion' or 'candidate'; null (the default) sets none: "
            "the job's model URI is then models:/<name>/<version>, and models:/<name>@latest (MLflow's own "
            "reference to the newest version) still finds it. 'latest' and v<digits> are reserved by MLflow "
            "and refused"
        ),
    )

    @field_validator("alias")
    @classmethod
    def _alias_not_reserved(cls, v: str | None) -> str | None:
        # MLflow refuses v<digits> only at registration, i.e. after the whole training run, and silently never
        # sets 'latest' (it always resolves to the newest version): refuse both before anything runs.
        if v is not None and _VERSION_ALIAS.match(v):
            raise ValueError(f"{v!r} is reserved by MLflow (v<digits> names a version); choose another alias")
        if v is not None and v.lower() == "latest":
            raise ValueError(
                f"{v!r} is reserved by MLflow: models:/<name>@latest always means the newest version, so it cannot be "
                "set as an alias; leave register.alias null (models:/<name>@latest finds the newest version) or "
                "name a real alias such as 'champion'"
            )
        return v
