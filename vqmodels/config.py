"""The one way model configs go to and come back from JSON (checkpoints carry their config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
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


class SavesConfig:
    """Mixin for models with a `config` dataclass: `config_dict()` (plain JSON) and `save(dir)`."""

    config: Any

    def config_dict(self) -> dict[str, Any]:
        """The config as JSON data (tuples as lists), what `save` writes beside the weights."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}

    def save(self, directory: str | Path, *, inference_only: bool = False, extra: dict[str, Any] | None = None) -> Path:
        """Write weights + config.json to `directory` (see `vqmodels.checkpoint.save`)."""
        from vqmodels.checkpoint import save

        return save(self, directory, inference_only=inference_only, extra=extra)  # type: ignore[arg-type]
