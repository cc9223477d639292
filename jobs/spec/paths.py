"""The local paths a spec names, and the rules for them: every path under the service's allowed roots
(`check_allowed_roots`), relative paths made absolute before the spec travels (`absolute_paths`), and none on
this machine's disk when the job's workers sit on other nodes (`cluster_storage_errors`)."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import braceexpand

from jobs.spec.errors import SpecError
from jobs.spec.job import JobSpec
from jobs.spec.model import TokenizerModelSpec
from jobs.spec.parse import parse_spec
from vqbase.protocol import HOME_ENV, SHARED_ROOTS_ENV
from vqbase.uris import is_url, url_scheme


def local_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(field path, local path) for every local path the job will read or write."""
    found: list[tuple[str, str]] = []

    def add(loc: str, value: str | list[str] | None) -> None:
        values = [value] if isinstance(value, str) else list(value or [])
        for i, whole in enumerate(values):
            for v in whole.split("::"):  # webdataset joins patterns with `::`: each part is a path of its own
                scheme = url_scheme(v)
                if not v or (scheme and scheme != "file"):
                    continue
                path = v[len("file://") :] if v.lower().startswith("file://") else v
                found.append((loc if isinstance(value, str) else f"{loc}[{i}]", path))

    add("data.train", spec.data.train)
    add("data.eval", spec.data.eval)
    for name in ("fid_weights", "classifier", "reference_stats", "lpips_weights"):
        add(f"evaluation.{name}", getattr(spec.evaluation, name))
    add("checkpoint.storage", spec.checkpoint.storage)
    add("output", spec.output)
    if spec.tokenizer and not spec.tokenizer.startswith("models:"):
        add("tokenizer", spec.tokenizer)
    if isinstance(spec.model, TokenizerModelSpec) and spec.model.perceptual:
        add("model.perceptual.weights", spec.model.perceptual.weights)
    return found


def _pattern_start(path: str) -> int:
    """Index of the first brace/glob pattern character in `path` (len(path) if it has none)."""
    return min([i for i in (path.find(c) for c in "{*?[") if i >= 0], default=len(path))


def _static_prefix(path: str) -> Path:
    """The part of a (possibly brace/glob-patterned) path before the first pattern character."""
    cut = _pattern_start(path)
    head = path[:cut]
    return Path(head if head.endswith("/") or cut == len(path) else head.rsplit("/", 1)[0] or "/")


MAX_EXPANSIONS = 100_000  # paths one brace pattern may expand to (a shard list of ImageNet is 1,282)

# `..` as a path part or a brace alternative (`{..,a}`): past a pattern character it escapes the prefix check
_DOTDOT = re.compile(r"(^|[/{,])\.\.($|[/},])")


def check_allowed_roots(spec: JobSpec, roots: Iterable[str | Path], base: str | Path | None = None) -> None:
    """Service side: every local path must resolve under one of `roots` (relative paths from `base`)."""
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    base_dir = Path(base or Path.cwd())
    errors = []
    for loc, pattern in local_paths(spec):
        # braces expanded first (`.{.,}` is `..` once expanded); what stays a pattern (* ? [) must hold no `..`
        paths = list(itertools.islice(braceexpand.braceexpand(pattern), MAX_EXPANSIONS + 1))
        if len(paths) > MAX_EXPANSIONS:
            errors.append({"loc": loc, "msg": f"{pattern!r} expands to more than {MAX_EXPANSIONS} paths"})
            continue
        for path in paths:
            if _DOTDOT.search(path[_pattern_start(path) :]):  # after a pattern character it would escape the check
                errors.append({"loc": loc, "msg": f"local path {pattern!r} must not contain '..' after a pattern"})
                break
            p = _static_prefix(path).expanduser()
            p = (p if p.is_absolute() else base_dir / p).resolve()
            if not any(p == r or r in p.parents for r in resolved_roots):
                allowed = ", ".join(str(r) for r in resolved_roots) or "(none configured)"
                errors.append({"loc": loc, "msg": f"local path {pattern!r} is outside the allowed roots: {allowed}"})
                break
    if errors:
        raise SpecError(errors)


def absolute_paths(spec: JobSpec, base: str | Path) -> JobSpec:
    """A copy whose relative local paths are made absolute against `base` (specs travel to other cwds)."""
    data = spec.model_dump(mode="json")
    base_dir = Path(base).resolve()

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, str) and not is_url(v) and not v.startswith(("/", "~")):
            full = str(base_dir / v)  # `../x` collapsed up to the folder that holds the first pattern
            cut = _pattern_start(full)
            if cut == len(full):
                return os.path.normpath(full)
            head, sep, rest = full[:cut].rpartition("/")
            return os.path.normpath(head) + sep + rest + full[cut:] if sep else full
        return v

    data["data"]["train"] = fix(data["data"]["train"])
    data["data"]["eval"] = fix(data["data"]["eval"])
    for key in ("output", "tokenizer"):
        data[key] = fix(data[key])
    data["checkpoint"]["storage"] = fix(data["checkpoint"]["storage"])
    for name in ("fid_weights", "classifier", "reference_stats", "lpips_weights"):
        data["evaluation"][name] = fix(data["evaluation"][name])
    data["evaluation"]["sha256"] = {fix(k): v for k, v in data["evaluation"]["sha256"].items()}
    if data["kind"] == "tokenizer" and data["model"].get("perceptual"):
        data["model"]["perceptual"]["weights"] = fix(data["model"]["perceptual"]["weights"])
    return parse_spec(data)


# what to use instead of this machine's disk, per field, when the job's workers sit on other nodes
_SHARED_INSTEAD = {
    "data": "put the shards in object storage (`vqtrain shards make SRC s3://bucket/prefix`) and name that, or "
    f"list a filesystem every node mounts in ${SHARED_ROOTS_ENV}",
    "checkpoint": "give checkpoint.storage: s3://bucket/prefix (the default is a folder on this machine)",
    "output": "write the token shards to object storage: output: s3://bucket/prefix",
    "tracking": "run MLflow with --serve-artifacts (artifacts behind the server, e.g. in S3), not a file: root",
}


def cluster_storage_errors(
    spec: JobSpec, artifact_root: str | None = None, shared_roots: Iterable[str] = ()
) -> list[dict[str, str]]:
    """Field errors for a job whose workers run on other nodes of a Ray cluster: local shards, the checkpoint
    folder (the default one too), token output and an MLflow artifact root on the local disk would be found
    on no other node or, worse, written to a different disk on each. `artifact_root` is the MLflow
    experiment's artifact location when known; paths under `shared_roots` (a filesystem every node mounts,
    `$VQTRAIN_SHARED_ROOTS`) pass. Empty when the spec is fit for a cluster."""
    msg = "is on this machine's disk, which the job's workers on other nodes of the Ray cluster cannot see"
    # local weights and tokenizer files may be baked into the image every node runs: not refused
    def section(loc: str) -> str:
        return loc.split(".")[0].split("[")[0]

    shared = [Path(r).expanduser().resolve() for r in shared_roots]

    def on_shared(path: str) -> bool:
        p = _static_prefix(path).expanduser().resolve()
        return any(p == r or r in p.parents for r in shared)

    found = [(loc, path) for loc, path in local_paths(spec) if section(loc) in _SHARED_INSTEAD and not on_shared(path)]
    if spec.checkpoint.storage is None:
        found.append(("checkpoint.storage", f"<{HOME_ENV}>/checkpoints (the default)"))
    errors = [{"loc": loc, "msg": f"{path!r} {msg}: {_SHARED_INSTEAD[section(loc)]}"} for loc, path in found]
    if artifact_root and (artifact_root.startswith(("file:", "/")) or ":" not in artifact_root):
        errors.append({"loc": "tracking.experiment",
                       "msg": f"the MLflow artifact root {artifact_root!r} {msg}: {_SHARED_INSTEAD['tracking']}"})  # fmt: skip
    return errors
