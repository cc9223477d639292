"""The job spec: one YAML/JSON document per job, validated before anything runs.

Torch-free on purpose (the service and the CLI import it). Every error names its field path (`data.train`,
`quantizer.beta`, ...) through `SpecError.errors`. Import from `jobs.spec`; the modules hold one concept each:

- `errors`: FieldError, SpecError, and pydantic's errors turned into field-path errors (`errors_from`)
- `fields`: the strict base model of every section, the job-name pattern, URL and control-character checks
- `data`, `model`, `quantizer`, `training`, `evaluation`: the sections (`training`: optim, resources,
  checkpoint, tracking and register); `quantizer` is built from `vqmodels.quantize.options.QuantizerOptions`
- `job`: `JobSpec`, the whole document, and its rules across fields
- `parse`: text → document → JobSpec (the hardened YAML loader, `parse_text`, `parse_spec`, `load_spec`), the
  size check, and the upgrade of stored documents
- `params`: the run's MLflow params and the redacted form for showing
- `paths`: the local paths a spec names and their rules (allowed roots, absolute paths, cluster storage)
"""

from __future__ import annotations

from jobs.spec.data import DataSpec
from jobs.spec.errors import MAX_ERRORS, FieldError, SpecError, errors_from
from jobs.spec.evaluation import EvaluationSpec
from jobs.spec.fields import NAME_PATTERN, check_url
from jobs.spec.job import JobSpec, Kind
from jobs.spec.model import AdversarialSpec, MaskGITModelSpec, ModelSpec, PerceptualSpec, TokenizerModelSpec
from jobs.spec.params import CORE_PARAMS, flatten_spec, redacted, run_params
from jobs.spec.parse import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    check_spec_size,
    load_spec,
    parse_spec,
    parse_text,
    upgrade_stored,
)
from jobs.spec.paths import (
    MAX_EXPANSIONS,
    absolute_paths,
    check_allowed_roots,
    cluster_storage_errors,
    local_paths,
)
from jobs.spec.quantizer import QuantizerSpec
from jobs.spec.training import (
    ALIAS_PATTERN,
    MAX_ALIAS_LENGTH,
    CheckpointSpec,
    OptimSpec,
    RegisterSpec,
    ResourcesSpec,
    TrackingSpec,
)
from vqbase.protocol import MAX_SPEC_JSON_BYTES, SHARED_ROOTS_ENV, spec_json
from vqbase.uris import URL_SCHEMES, pinned_model_uri

__all__ = [
    "ALIAS_PATTERN",
    "CORE_PARAMS",
    "MAX_ALIAS_LENGTH",
    "MAX_DEPTH",
    "MAX_ERRORS",
    "MAX_EXPANSIONS",
    "MAX_INT_DIGITS",
    "MAX_SPEC_JSON_BYTES",
    "NAME_PATTERN",
    "SHARED_ROOTS_ENV",
    "URL_SCHEMES",
    "AdversarialSpec",
    "CheckpointSpec",
    "DataSpec",
    "EvaluationSpec",
    "FieldError",
    "JobSpec",
    "Kind",
    "MaskGITModelSpec",
    "ModelSpec",
    "OptimSpec",
    "PerceptualSpec",
    "QuantizerSpec",
    "RegisterSpec",
    "ResourcesSpec",
    "SpecError",
    "TokenizerModelSpec",
    "TrackingSpec",
    "absolute_paths",
    "check_allowed_roots",
    "check_spec_size",
    "check_url",
    "cluster_storage_errors",
    "errors_from",
    "flatten_spec",
    "load_spec",
    "local_paths",
    "parse_spec",
    "parse_text",
    "pinned_model_uri",
    "redacted",
    "run_params",
    "spec_json",
    "upgrade_stored",
]
