"""`JobSpec`, the whole document: its sections, the job's `kind`, the references to registered models
(`evaluate:`, `tokenizer:`) and the rules across fields (which kind takes which field, what each requires).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from jobs.spec.data import DataSpec
from jobs.spec.errors import FieldError
from jobs.spec.evaluation import EvaluationSpec
from jobs.spec.fields import NAME_PATTERN, StrictModel, check_url, check_urls
from jobs.spec.model import MaskGITModelSpec, ModelSpec, TokenizerModelSpec, models_for_kind
from jobs.spec.quantizer import QuantizerSpec
from jobs.spec.training import CheckpointSpec, OptimSpec, RegisterSpec, ResourcesSpec, TrackingSpec
from vqbase.uris import is_model_uri, url_scheme
from vqmodels.quantize.options import fsq_levels_for

Kind = Literal["tokenizer", "maskgit", "tokenize", "eval"]

# `register` is a spec field and also ABCMeta.register on the class (not on instances): harmless.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class JobSpec(StrictModel):
    """One training or tokenizing job."""

    kind: Kind = "tokenizer"
    name: str = Field(
        pattern=NAME_PATTERN, max_length=100, description="also the default registered model name"
    )
    data: DataSpec
    model: ModelSpec | None = Field(None, description="tokenizer/maskgit model; null = the kind's defaults")
    quantizer: QuantizerSpec = Field(default_factory=QuantizerSpec)  # type: ignore[valid-type]
    optim: OptimSpec = Field(default_factory=OptimSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    register: RegisterSpec = Field(default_factory=RegisterSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    evaluate: str | None = Field(
        None, description="eval: the registered model to evaluate, models:/<name>@<alias> or models:/<name>/<version>"
    )
    tokenizer: str | None = Field(
        None, description="maskgit/tokenize: models:/<name>@<alias>, models:/<name>/<version> or a local dir"
    )
    output: str | None = Field(None, description="tokenize: where the token shards go")

    @model_validator(mode="wrap")
    @classmethod
    def _with_kind(cls, data: Any, handler: Any) -> JobSpec:
        kind = data.get("kind", "tokenizer") if isinstance(data, Mapping) else None
        with models_for_kind(kind if isinstance(kind, str) else None):
            return handler(data)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_ref(cls, v: str | None) -> str | None:
        if v is None or is_model_uri(v):
            return v
        if v.startswith("models:"):
            raise ValueError("must be models:/<name>@<alias> or models:/<name>/<version>")
        scheme = url_scheme(v)
        if scheme and scheme != "file":
            raise ValueError("must be a models:/ URI or a local directory")
        return check_url(v)

    _output = field_validator("output")(check_urls)

    @field_validator("evaluate")
    @classmethod
    def _evaluate_ref(cls, v: str | None) -> str | None:
        if v is not None and not is_model_uri(v):
            raise ValueError("must be models:/<name>@<alias> or models:/<name>/<version>")
        return v

    @model_validator(mode="after")
    def _kind_rules(self) -> JobSpec:
        if self.kind != "eval" and self.data.train is None:
            raise FieldError("data.train", "required field is missing")
        if self.kind != "eval" and self.evaluate is not None:
            raise FieldError("evaluate", "only eval jobs take this (the model to evaluate)")
        if self.kind == "eval":
            for field in ("tokenizer", "output", "model"):
                if getattr(self, field) is not None:
                    raise FieldError(field, "an eval job takes the model from `evaluate`; remove this")
            if self.evaluate is None:
                raise FieldError("evaluate", "required for kind=eval (models:/<name>@<alias>)")
            if self.data.eval is None:
                raise FieldError("data.eval", "required for kind=eval (the shards to evaluate on)")
        elif self.kind == "tokenizer":
            for field in ("tokenizer", "output"):
                if getattr(self, field) is not None:
                    raise FieldError(
                        field, "only maskgit/tokenize jobs take this; remove it for kind=tokenizer"
                    )
            if self.model is None:
                self.model = TokenizerModelSpec()
            assert isinstance(self.model, TokenizerModelSpec)
            downsample = self.model.downsample
            if self.data.image_size % downsample:
                raise FieldError(
                    "data.image_size",
                    f"must be divisible by the downsampling factor {downsample} (2 ** (len(channel_mult) - 1))",
                )
            self._implicit_codebook_rules()
        else:
            if self.tokenizer is None:
                raise FieldError(
                    "tokenizer", f"required for kind={self.kind} (models:/<name>@<alias> or a dir)"
                )
            if self.kind == "maskgit":
                if self.output is not None:
                    raise FieldError("output", "only tokenize jobs take this")
                if self.model is None:
                    self.model = MaskGITModelSpec()
            elif self.output is None:
                raise FieldError("output", "required for kind=tokenize (where the token shards go)")
        return self

    def _implicit_codebook_rules(self) -> None:
        """FSQ's codebook is the product of its levels, LFQ's a power of two: checked here, where both the
        quantizer section and the model's codebook_size are known."""
        q, k = self.quantizer, self.model.codebook_size
        if q.method == "fsq":
            try:
                fsq_levels_for(q.fsq_levels, k)
            except ValueError as e:
                msg = str(e).removeprefix("fsq_levels: ").replace("codebook_size", "model.codebook_size")
                raise FieldError("quantizer.fsq_levels", msg) from None
        if q.method == "lfq" and (k < 2 or k & (k - 1)):
            raise FieldError("model.codebook_size", f"LFQ has 2^bits codes; {k} is not a power of two")

    @property
    def model_name(self) -> str:
        """The registered model name (`register.model_name`, else `name`)."""
        return self.register.model_name or self.name
