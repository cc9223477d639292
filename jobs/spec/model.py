"""The `model:` section, whose class follows the job's `kind`: the tokenizer's (stage one, a convolutional
VQ autoencoder) or MaskGIT's (stage two, a transformer over the tokenizer's codes). Tokenize and eval jobs
take no model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from jobs.spec.errors import FieldError
from jobs.spec.fields import StrictModel, check_urls


class AdversarialSpec(StrictModel):
    weight: float = Field(0.1, ge=0, le=1000)
    start_step: int = Field(2000, ge=0, le=10**9)
    loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_channels: int = Field(64, ge=1, le=4096)


class PerceptualSpec(StrictModel):
    weights: str = Field(description="path to the perceptual network's weights (.pt)")
    weight: float = Field(1.0, ge=0, le=1000)

    _url = field_validator("weights")(check_urls)


class TokenizerModelSpec(StrictModel):
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

    @property
    def downsample(self) -> int:
        """How many pixels one code stands for along each side: 2 ** (len(channel_mult) - 1), 2 to 16."""
        return 2 ** (len(self.channel_mult) - 1)


class MaskGITModelSpec(StrictModel):
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
# (`models_for_kind`) for the duration of its own validation so a discriminated union can pick the class.
_KIND: ContextVar[str | None] = ContextVar("vqtrain_spec_kind", default=None)


@contextmanager
def models_for_kind(kind: str | None) -> Iterator[None]:
    """Within this block a `model:` mapping is validated as the model of a `kind` job."""
    token = _KIND.set(kind)
    try:
        yield
    finally:
        _KIND.reset(token)


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
