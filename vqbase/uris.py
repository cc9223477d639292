"""One parser per kind of address: registry references (`models:/name@alias`, `models:/name/3`) and the
scheme of a data or weights URL. The spec, the jobs, the service and the model loader all use these."""

from __future__ import annotations

import re
from dataclasses import dataclass

URL_SCHEMES = ("file", "s3", "gs", "http", "https")  # where a spec may read data and weights from
MLFLOW_SCHEMES = ("models", "runs", "mlflow-artifacts")  # MLflow artifact URIs (weights may live there)

_NAME = r"[A-Za-z0-9][A-Za-z0-9\-_.]*"
_ALIAS = r"[A-Za-z0-9][A-Za-z0-9\-_]*"
_VERSION = r"[0-9]{1,18}"  # a registry version number (int64); longer digit strings are no version
_REF = re.compile(rf"^(?P<name>{_NAME})(?:@(?P<alias>{_ALIAS})|/(?P<version>{_VERSION}))?\Z")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


@dataclass(frozen=True)
class ModelRef:
    """A registered model, and which of its versions: an alias, a version number, or neither (the newest)."""

    name: str
    alias: str | None = None
    version: int | None = None

    @property
    def pinned(self) -> bool:
        """A fixed version (an alias may move)."""
        return self.version is not None

    @property
    def uri(self) -> str:
        tail = f"@{self.alias}" if self.alias else f"/{self.version}" if self.version is not None else ""
        return f"models:/{self.name}{tail}"


def parse_ref(text: str) -> ModelRef | None:
    """`name`, `name@alias` or `name/3` (the form `vqtrain pull` and the API take), else None."""
    m = _REF.match(text or "")
    if m is None:
        return None
    return ModelRef(m["name"], m["alias"], int(m["version"]) if m["version"] else None)


def parse_model_uri(uri: str | None, *, need_version: bool = True) -> ModelRef | None:
    """`models:/name@alias` or `models:/name/<version>` (also bare `models:/name` unless `need_version`), else
    None: run URIs, `models:/m-<id>` logged-model paths with sub-paths, local paths and other URLs."""
    if not uri or not uri.startswith("models:/"):
        return None
    ref = parse_ref(uri[len("models:/"):])
    if ref is None or (need_version and ref.alias is None and ref.version is None):
        return None
    return ref


_REF_PREFIX = re.compile(
    rf"^models:/(?P<name>{_NAME})(?:@(?P<alias>{_ALIAS})|/(?P<version>{_VERSION})|/(?P<latest>(?i:latest)))?(?=/|\Z)"
)


def split_model_uri(uri: str) -> tuple[ModelRef | None, str]:
    """(the reference, the path inside the model) of `models:/name@alias/sub/path`, `models:/name/3/sub`,
    `models:/name/latest/sub` or `models:/name` (the newest version); (None, "") for anything else: run URIs,
    and MLflow's stage form `models:/name/Production`, which only MLflow itself resolves."""
    m = _REF_PREFIX.match(uri or "")
    if m is None:
        return None, ""
    rest = uri[m.end():].strip("/")
    if not (m["alias"] or m["version"] or m["latest"]) and rest:
        return None, ""  # `models:/name/<stage>/...`
    ref = ModelRef(m["name"], m["alias"], int(m["version"]) if m["version"] else None)
    return ref, rest


def pinned_model_uri(uri: str | None) -> bool:
    """True for a fixed registry version, `models:/name/<number>` (an alias may move; a path may be anything)."""
    ref = parse_model_uri(uri)
    return ref is not None and ref.pinned


def url_scheme(url: str | None) -> str | None:
    """The lower-cased scheme of `scheme:...` (`s3`, `pipe`, `models`, ...), None for a plain path. A Windows
    drive letter is no concern: jobs run on Linux."""
    m = _SCHEME.match(url or "")
    return m.group(1).lower() if m else None


def is_url(url: str | None) -> bool:
    """`scheme://...` or `scheme:/...` (anything with a scheme but a bare path), as opposed to a local path."""
    return url_scheme(url) is not None


def scheme_end(url: str) -> int:
    """Index just past `scheme:` (0 for a plain path)."""
    m = _SCHEME.match(url)
    return m.end() if m else 0


def is_model_uri(uri: str | None) -> bool:
    """True where `parse_model_uri(uri)` finds a versioned or aliased reference."""
    return parse_model_uri(uri) is not None
