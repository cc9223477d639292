"""The one way model configs are rebuilt from JSON (checkpoints carry their config)."""

from __future__ import annotations

import dataclasses
from typing import Any, Self


class FromDict:
    """Mixin for config dataclasses: `from_dict` that names unknown keys instead of ignoring them."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from plain JSON data; unknown keys are an error naming them."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
        return cls(**data)
