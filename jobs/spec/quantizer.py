"""The `quantizer:` section: a named preset plus explicit overrides of the vector quantizer's options.

Built from the `vqmodels.quantize.options.QuantizerOptions` dataclass (a torch-free module), so option names,
types, defaults and presets live in exactly one place; after validation every option holds its resolved value.
"""

from __future__ import annotations

import dataclasses
import re
import typing

from pydantic import Field, create_model, model_validator

from jobs.spec.errors import FieldError
from jobs.spec.fields import StrictModel
from vqmodels.quantize.options import PRESETS, QuantizerOptions, resolve_options


class _QuantizerBase(StrictModel):
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


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


_HINTS = typing.get_type_hints(QuantizerOptions)
_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizerOptions))
QuantizerSpec = create_model(
    "QuantizerSpec",
    __base__=_QuantizerBase,
    __doc__="Every `QuantizerOptions` field (null = from the preset) plus `preset`.",
    **{
        f.name: (
            _HINTS[f.name] | None,
            Field(None, description=f"null = from the preset (plain default: {_default(f)!r})"),
        )
        for f in dataclasses.fields(QuantizerOptions)
    },
)
