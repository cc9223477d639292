"""What every section of the spec shares: the strict base model (no unknown keys, no inf/NaN, no huge
numbers), the job-name pattern, and the checks of free text and of data/weights URLs."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from vqbase.uris import URL_SCHEMES, scheme_end, url_scheme

NAME_PATTERN = r"^[a-z0-9][a-z0-9\-_.]*$"  # a job or registered model name
MAX_NUMBER = 10**12  # no spec number is larger; past it a typo or an attack, never a setting


class StrictModel(BaseModel):
    """The base of every spec section."""

    # allow_inf_nan=False: `lr: .inf` or `1e400` would be stored as JSON null, and `grad_clip: Infinity`
    # would silently turn clipping off
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        """A ceiling for every number a section holds (quantizer options included); fields with a tighter
        meaningful bound say so in their own `le=`."""
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > MAX_NUMBER:
            raise ValueError(f"must be at most {MAX_NUMBER:.0e} in size")
        return v


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def no_control_characters(v: str) -> str:
    """Names end up in log lines, MLflow and terminals: a newline could forge a protocol line."""
    if _CONTROL.search(v):
        raise ValueError("must not contain control characters (newlines, tabs, ...)")
    return v


def check_url(url: str, field: str = "url") -> str:
    """Refuse `pipe:` and unknown schemes: a spec must never make a worker run a shell command."""
    if not url or not url.strip():
        raise ValueError("must not be empty")
    if "::" in url:  # webdataset joins patterns with `::`: every part must pass on its own
        for part in url.split("::"):
            if part:
                check_url(part, field)
        return url
    if url.startswith("pipe:"):
        raise ValueError(
            "pipe: URLs are refused (they run shell commands); use a path or s3://, gs://, http(s)://"
        )
    scheme = url_scheme(url)
    if scheme and not (scheme in URL_SCHEMES and url[scheme_end(url) :].startswith("//")):
        raise ValueError(
            f"unsupported URL scheme {url[: scheme_end(url) - 1]!r}; use a local path or one of "
            f"{', '.join(s + '://' for s in URL_SCHEMES)}"
        )
    return url


def check_urls(value: str | list[str] | None) -> str | list[str] | None:
    """`check_url` for a field that holds one URL, a non-empty list of them, or null."""
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise ValueError("must list at least one URL")
        for url in value:
            check_url(url)
        return value
    return check_url(value)
