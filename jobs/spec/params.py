"""The spec as others see it: the run's MLflow params (`run_params`, a few; `flatten_spec`, all as dot-keys)
and the form for showing (`redacted`: credentials replaced by '***')."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from jobs.credentials import redact_spec
from jobs.spec.job import JobSpec

CORE_PARAMS = ("kind", "optim.steps", "optim.batch_size", "optim.lr", "resources.workers", "model.codebook_size",
               "quantizer.preset", "model.dim", "model.depth")


def flatten_spec(spec: JobSpec) -> dict[str, str]:
    """Dot-keyed string values of the whole resolved spec; secrets in `data.storage_options` are redacted."""
    return _flatten(redacted(spec))


def run_params(spec: JobSpec) -> dict[str, str]:
    """The run's MLflow params: the few hyperparameters runs are compared by (nulls left out). Few on purpose:
    MLflow prints a run's params above each of its pictures, where a long list hides the picture. The whole
    resolved spec is the artifact `spec/spec.yaml` (and `flatten_spec` gives it as dot-keys)."""
    full = flatten_spec(spec)
    return {k: full[k] for k in CORE_PARAMS if full.get(k) not in (None, "null")}


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = data if isinstance(data, str) else json.dumps(data)
    return out


def redacted(spec: JobSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The spec (or its stored JSON form) for showing: values under secret-looking storage-option keys,
    URL user-info and credential-shaped strings replaced by '***' (specs with credentials are refused, but
    rows stored before that rule, or a credential no rule knows by name, may still hold some)."""
    data = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else json.loads(json.dumps(spec))
    return redact_spec(data)
