"""Sections of the job spec (data, model, quantizer, optim, resources, checkpoint, tracking, register)
and the checks they share. `jobs.spec` assembles them into `JobSpec`; import from there.
"""

from __future__ import annotations

import dataclasses
import re
import typing
import warnings
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from vqmodels.quantize.options import PRESETS, QuantizerOptions, resolve_options

Kind = Literal["tokenizer", "maskgit", "tokenize", "eval"]
NAME_PATTERN = r"^[a-z0-9][a-z0-9\-_.]*$"
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9\-_]*$"
MAX_ALIAS_LENGTH = 255  # MLflow's limit on alias names
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")  # MLflow reserves these: models:/name@v3 means version 3
URL_SCHEMES = ("file", "s3", "gs", "http", "https")
_MODEL_URI = re.compile(r"^models:/[A-Za-z0-9][A-Za-z0-9\-_.]*(@[A-Za-z0-9][A-Za-z0-9\-_]*|/[0-9]+)$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_SECRET_KEYS = re.compile(r"(key|secret|token|password|credential)", re.IGNORECASE)


class FieldError(ValueError):
    """A validator error that knows its field path relative to the model that raised it."""

    def __init__(self, path: str, msg: str) -> None:
        super().__init__(f"{path}: {msg}")
        self.path, self.msg = path, msg


class SpecError(ValueError):
    """An invalid spec; `.errors` is a list of `{"loc": "data.train", "msg": ...}`, one per problem."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        lines = [f"  {e['loc'] or '<spec>'}: {e['msg']}" for e in errors]
        super().__init__("invalid job spec:\n" + "\n".join(lines))


MAX_NUMBER = 10**12  # no spec number is larger; past it a typo or an attack, never a setting


class _Strict(BaseModel):
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
    m = _SCHEME.match(url)
    if m and not (m.group(1).lower() in URL_SCHEMES and url[m.end() :].startswith("//")):
        raise ValueError(
            f"unsupported URL scheme {m.group(1)!r}; use a local path or one of "
            f"{', '.join(s + '://' for s in URL_SCHEMES)}"
        )
    return url


def _check_urls(value: str | list[str] | None) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise ValueError("must list at least one URL")
        for url in value:
            check_url(url)
        return value
    return check_url(value)


# ---------------------------------------------------------------------------------------------- data


class DataSpec(_Strict):
    """Where the WebDataset shards are and how to stream them."""

    train: str | list[str] | None = Field(
        None, description="brace pattern, prefix/dir, manifest.json URL, or a list of them (required but for kind=eval)"
    )
    eval: str | list[str] | None = Field(None, description="same forms as train; optional")
    image_size: int = Field(32, ge=8, le=4096)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec/s3fs")
    shuffle_buffer: int = Field(1000, ge=0, le=10**7)
    num_workers: int = Field(1, ge=0, le=64, description="dataloader workers per training worker")
    epoch_batches: int | None = Field(
        None, ge=1, le=10**9, description="batches per rank per epoch; null = from manifest"
    )

    _urls = field_validator("train", "eval")(_check_urls)


# --------------------------------------------------------------------------------------------- models


class AdversarialSpec(_Strict):
    weight: float = Field(0.1, ge=0, le=1000)
    start_step: int = Field(2000, ge=0, le=10**9)
    loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_channels: int = Field(64, ge=1, le=4096)


class PerceptualSpec(_Strict):
    weights: str = Field(description="path to the perceptual network's weights (.pt)")
    weight: float = Field(1.0, ge=0, le=1000)

    _url = field_validator("weights")(_check_urls)


class TokenizerModelSpec(_Strict):
    """Stage one: a convolutional VQ autoencoder (VQ-VAE / VQGAN style)."""

    channels: int = Field(64, ge=1, le=4096)
    channel_mult: list[int] = Field(
        [1, 2, 2], min_length=2, max_length=5, description="downsampling = 2 ** (len - 1): 2 to 16"
    )
    res_blocks: int = Field(1, ge=1, le=32)
    attention: bool = False
    code_dim: int = Field(64, ge=1, le=8192)
    codebook_size: int = Field(1024, ge=2, le=2**24)
    rec_loss: Literal["l1", "l2"] = "l2"
    adversarial: AdversarialSpec | None = None
    perceptual: PerceptualSpec | None = None

    @field_validator("channel_mult")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(m < 1 or m > 64 for m in v):
            raise ValueError("every multiplier must be between 1 and 64")
        return v


class MaskGITModelSpec(_Strict):
    """Stage two: a bidirectional transformer over a frozen tokenizer's codes."""

    dim: int = Field(256, ge=8, le=16384)
    depth: int = Field(4, ge=1, le=256)
    heads: int = Field(4, ge=1, le=256)
    mlp_ratio: int = Field(4, ge=1, le=64)
    schedule: Literal["cosine", "linear", "square"] = "cosine"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    class_dropout: float = Field(0.1, ge=0, le=1)
    num_classes: int | None = Field(10, ge=1, le=10**6, description="null = unconditional")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> MaskGITModelSpec:
        if self.dim % self.heads:
            raise FieldError("heads", f"must divide dim ({self.dim}), got {self.heads}")
        return self


# Which model spec `model:` is validated against depends on the sibling `kind`; JobSpec sets this
# for the duration of its own validation so a discriminated union can pick the right class.
_KIND: ContextVar[str | None] = ContextVar("vqtrain_spec_kind", default=None)


def _model_tag(value: Any) -> str | None:
    if isinstance(value, TokenizerModelSpec):
        return "tokenizer"
    if isinstance(value, MaskGITModelSpec):
        return "maskgit"
    kind = _KIND.get()
    return kind if kind in ("tokenizer", "maskgit") else None


ModelSpec = Annotated[
    Annotated[TokenizerModelSpec, Tag("tokenizer")] | Annotated[MaskGITModelSpec, Tag("maskgit")],
    Discriminator(
        _model_tag,
        custom_error_type="model_for_kind",
        custom_error_message="kind=tokenize and kind=eval take no model; tokenizer and maskgit jobs do",
    ),
]


# ------------------------------------------------------------------------------------------ quantizer


class _QuantizerBase(_Strict):
    """Preset + explicit overrides; after validation every option holds its resolved value."""

    preset: str = Field("default", description=f"named option set, one of {sorted(PRESETS)}")

    @model_validator(mode="after")
    def _resolve(self) -> _QuantizerBase:
        explicit = {k: getattr(self, k) for k in _OPTION_FIELDS if getattr(self, k) is not None}
        try:
            opts = resolve_options(self.preset, **explicit)
        except ValueError as e:
            msg = str(e)
            head, sep, rest = msg.partition(": ")
            if sep and (head in _OPTION_FIELDS or head == "preset"):
                raise FieldError(head, rest) from None
            named = [n for n in _OPTION_FIELDS if re.search(rf"\b{n}\b", msg)]
            raise FieldError(named[0], msg) if named else ValueError(msg) from None
        for name, value in dataclasses.asdict(opts).items():
            object.__setattr__(self, name, value)
        return self

    def options(self) -> QuantizerOptions:
        """The resolved `QuantizerOptions` the model is built with."""
        return QuantizerOptions(**{k: getattr(self, k) for k in _OPTION_FIELDS})


_HINTS = typing.get_type_hints(QuantizerOptions)
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizerOptions))
QuantizerSpec = create_model(
    "QuantizerSpec",
    __base__=_QuantizerBase,
    __doc__="Every `QuantizerOptions` field (null = from the preset) plus `preset`.",
    **{
        f.name: (
            _HINTS[f.name] | None,
            Field(None, description=f"null = from the preset (plain default: {f.default!r})"),
        )
        for f in dataclasses.fields(QuantizerOptions)
    },
)


# -------------------------------------------------------------------------------------- the rest


class OptimSpec(_Strict):
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


class ResourcesSpec(_Strict):
    workers: int = Field(1, ge=1, le=4096)
    cpus_per_worker: float = Field(1, gt=0, le=1024)
    gpus_per_worker: float = Field(0, ge=0, le=16, description="a worker's GPUs sit on one node: at most 16")
    max_failures: int = Field(2, ge=0, le=1000, description="worker-group restarts from the last checkpoint")


class CheckpointSpec(_Strict):
    every: int = Field(200, ge=1, le=10**9, description="steps")
    every_minutes: float | None = Field(
        5, gt=0, le=24 * 60,
        description="also checkpoint once this much wall-clock time has passed since the last one (looked at every "
        "10 steps), so a lost node costs about these minutes plus 10 steps; null = steps only",
    )
    keep: int = Field(2, ge=1, le=1000)
    storage: str | None = Field(None, description="local dir or s3://...; null = <VQTRAIN_HOME>/checkpoints")

    _url = field_validator("storage")(_check_urls)


class TrackingSpec(_Strict):
    experiment: str = Field("vqtrain", min_length=1, max_length=200)
    eval_every: int = Field(200, ge=0, le=10**9, description="steps; 0 = off")
    image_every: int = Field(200, ge=0, le=10**9, description="steps; 0 = off")
    system_metrics: bool = Field(
        True, description="CPU, memory, disk, network (and GPU, with the gpu extra) of rank 0's node as system/* "
        "metrics every 10 s"
    )

    _names = field_validator("experiment")(no_control_characters)


class RegisterSpec(_Strict):
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


# `register` is a spec field and also ABCMeta.register on the class (not on instances): harmless.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)
