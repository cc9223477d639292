"""The `evaluation:` section of a job spec: which feature networks judge the model, from which weights,
and the protocol of the numbers (sample count, sampling settings). Torch-free, like the rest of the spec.

No weights named means the metric is not computed (the run says which and why); nothing is ever
downloaded from a public hub. A weights location is a local path, `s3://` / `http(s)://` in the user's
own store, or an MLflow artifact (`models:/...`, `runs:/...`, `mlflow-artifacts:/...`); each is fetched
once per node into a cache and, when `sha256` names its digest, checked against it.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from jobs.spec.fields import StrictModel, check_url
from vqbase.uris import MLFLOW_SCHEMES, scheme_end, url_scheme

DEFAULT_STEPS = 8
DEFAULT_GUIDANCE = 3.0
DEFAULT_TEMPERATURE = 1.0
DEFAULT_CHOICE_TEMPERATURE = 4.5
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_weights_url(url: str) -> str:
    """A weights location: what `check_url` allows, plus MLflow artifact URIs."""
    if url_scheme(url) in MLFLOW_SCHEMES:
        if not url[scheme_end(url):].startswith("/") or len(url) > 1000:
            raise ValueError(f"{url!r}: an MLflow artifact URI looks like models:/name@alias/path or runs:/<id>/path")
        return url
    return check_url(url)


class EvaluationSpec(StrictModel):
    """Feature networks (by weights location) and the sampling protocol of generator metrics."""

    fid_weights: str | None = Field(
        None, description="FID Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth, as torch-fidelity "
        "and torchmetrics load it): rFID, FID and Inception Score; null = not computed",
    )
    lpips_weights: str | list[str] | None = Field(
        None, description="LPIPS: [torchvision vgg16/alexnet weights, lpips linear layers (vgg.pth/alex.pth)] or one "
        "file holding both; null = not computed",
    )
    classifier: str | None = Field(
        None, description="a TorchScript classifier of the data's classes (float images in [-1, 1] -> logits; a "
        "`features` method, if it has one, gives the features of the domain FD): class-consistency accuracy "
        "and FD in its features; null = not computed",
    )
    sha256: dict[str, str] = Field(
        default_factory=dict, description="expected sha256 (hex) per weights location named above; checked at fetch"
    )
    reference_stats: str | None = Field(
        None, description="generator FID against this .npz (mu, sigma; `vqtrain eval stats`); null = the eval split",
    )
    num_samples: int = Field(
        10_000, ge=10, le=10**7, description="class-balanced samples for generator FID/IS (at most the eval split's "
        "size when no reference_stats)",
    )
    sample_steps: int = Field(DEFAULT_STEPS, ge=1, le=1024, description="MaskGIT decoding steps of those samples")
    guidance: float = Field(DEFAULT_GUIDANCE, ge=0, le=100, description="classifier-free guidance scale (0 = none)")
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=100, description="token sampling temperature")
    choice_temperature: float = Field(DEFAULT_CHOICE_TEMPERATURE, ge=0, le=100, description="Gumbel noise on confidence")
    every_eval: bool = Field(
        True, description="feature-network metrics (rFID, LPIPS, FID, IS) at every eval pass; false = at the end only",
    )

    @field_validator("fid_weights", "classifier", "reference_stats")
    @classmethod
    def _one_url(cls, v: str | None) -> str | None:
        return None if v is None else check_weights_url(v)

    @field_validator("lpips_weights")
    @classmethod
    def _lpips_urls(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if not 1 <= len(v) <= 2:
                raise ValueError("one file (both parts) or two: [backbone weights, lpips linear layers]")
            return [check_weights_url(u) for u in v]
        return None if v is None else check_weights_url(v)

    @field_validator("sha256")
    @classmethod
    def _digests(cls, v: dict[str, str]) -> dict[str, str]:
        for key, digest in v.items():
            if not _HEX64.match(digest.lower()):
                raise ValueError(f"sha256[{key!r}]: {digest!r} is not a sha256 hex digest (64 hex digits)")
        return {k: d.lower() for k, d in v.items()}

    @model_validator(mode="after")
    def _digests_name_weights(self) -> EvaluationSpec:
        named = set(self.locations())
        for key in self.sha256:
            if key not in named:
                raise ValueError(f"sha256 names {key!r}, which no weights field of this section names")
        return self

    def locations(self) -> list[str]:
        """Every weights/statistics location this section names."""
        lp = self.lpips_weights
        out = [self.fid_weights, self.classifier, self.reference_stats] + (lp if isinstance(lp, list) else [lp])
        return [u for u in out if u]
