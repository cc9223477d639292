"""The job spec: one YAML/JSON document per job, validated before anything runs.

Torch-free on purpose (the service and the CLI import it). The `quantizer:` section is built from
`vqmodels.quantize.options.QuantizerOptions` so option names live in exactly one place. Every error
names its field path (`data.train`, `quantizer.beta`, ...) through `SpecError.errors`.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import braceexpand
import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from jobs.credentials import credential_errors, redact_spec
from jobs.spec_evaluation import EvaluationSpec
from jobs.spec_sections import (  # noqa: F401  (re-exported: jobs.spec is the public module)
    _KIND,
    _MODEL_URI,
    _SCHEME,
    _SECRET_KEYS,
    ALIAS_PATTERN,
    MAX_ALIAS_LENGTH,
    NAME_PATTERN,
    URL_SCHEMES,
    AdversarialSpec,
    CheckpointSpec,
    DataSpec,
    FieldError,
    Kind,
    MaskGITModelSpec,
    ModelSpec,
    OptimSpec,
    PerceptualSpec,
    QuantizerSpec,
    RegisterSpec,
    ResourcesSpec,
    SpecError,
    TokenizerModelSpec,
    TrackingSpec,
    _check_urls,
    _Strict,
    check_url,
)


class JobSpec(_Strict):
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
        token = _KIND.set(kind if isinstance(kind, str) else None)
        try:
            return handler(data)
        finally:
            _KIND.reset(token)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_ref(cls, v: str | None) -> str | None:
        if v is None or _MODEL_URI.match(v):
            return v
        if v.startswith("models:"):
            raise ValueError("must be models:/<name>@<alias> or models:/<name>/<version>")
        m = _SCHEME.match(v)
        if m and m.group(1).lower() != "file":
            raise ValueError("must be a models:/ URI or a local directory")
        return check_url(v)

    _output = field_validator("output")(_check_urls)

    @field_validator("evaluate")
    @classmethod
    def _evaluate_ref(cls, v: str | None) -> str | None:
        if v is not None and not _MODEL_URI.match(v):
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
            downsample = 2 ** (len(self.model.channel_mult) - 1)
            if self.data.image_size % downsample:
                raise FieldError(
                    "data.image_size",
                    f"must be divisible by the downsampling factor {downsample} (2 ** (len(channel_mult) - 1))",
                )
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

    @property
    def model_name(self) -> str:
        """The registered model name (`register.model_name`, else `name`)."""
        return self.register.model_name or self.name


# ------------------------------------------------------------------------------------ public helpers

_KNOWN_FIELDS: set[str] = set()


def _collect_fields(model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        _KNOWN_FIELDS.add(name)
        for arg in _flat_types(info.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _collect_fields(arg)


def _flat_types(tp: Any) -> Iterable[Any]:
    args = typing.get_args(tp)
    if not args:
        yield tp
    for a in args:
        yield from _flat_types(a)


_collect_fields(JobSpec)
_collect_fields(EvaluationSpec)
_collect_fields(TokenizerModelSpec)
_collect_fields(MaskGITModelSpec)


def _loc(parts: Iterable[Any]) -> list[str]:
    """Drop pydantic's union/tag segments (`str`, `list[str]`, `tokenizer`…) so paths read like the YAML."""
    out: list[str] = []
    for i, p in enumerate(parts):
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif "[" in p or p in ("str", "int", "float", "bool", "list", "dict"):
            continue
        elif out == ["model"] and p in ("tokenizer", "maskgit") and i == 1:
            continue
        else:
            out.append(p)
    return out


def errors_from(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors → `[{"loc": "a.b", "msg": ...}]`, deduplicated, with validator paths resolved."""
    result: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    errors = exc.errors(include_url=False)
    bad_kind = any(e["loc"] == ("kind",) for e in errors)
    for n, err in enumerate(errors):
        if len(result) >= MAX_ERRORS:
            result.append({"loc": "", "msg": f"... and {len(errors) - n} more errors"})
            break
        if bad_kind and err["type"] == "model_for_kind":
            continue  # the model cannot be checked against an unknown kind; the kind error says it all
        parts = _loc(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        msg = err["msg"]
        if isinstance(cause, FieldError):
            parts, msg = parts + cause.path.split("."), cause.msg
        elif err["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif err["type"] == "extra_forbidden":
            name = str(err["loc"][-1])
            near = difflib.get_close_matches(name, _KNOWN_FIELDS, n=1)
            if name in _KNOWN_FIELDS:
                msg = "unknown field in this section (it belongs to another section or kind)"
            else:
                msg = "unknown field" + (f"; did you mean {near[0]!r}?" if near else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        loc = ".".join(parts).replace(".[", "[")
        if (loc, msg) not in seen:
            seen.add((loc, msg))
            result.append({"loc": loc, "msg": msg})
    return result


def parse_spec(data: Any) -> JobSpec:
    """Validate an already-parsed document (dict); raises SpecError."""
    if not isinstance(data, Mapping):
        raise SpecError(
            [{"loc": "", "msg": f"a spec is a mapping (YAML/JSON object), got {type(data).__name__}"}]
        )
    if leaks := credential_errors(data):  # refused first: a spec with a secret must go nowhere
        raise SpecError(leaks)
    try:
        return JobSpec.model_validate(dict(data))
    except ValidationError as e:
        raise SpecError(errors_from(e)) from None


MAX_DEPTH = 32  # nesting levels of a spec document; a real spec uses 4
MAX_INT_DIGITS = 30  # Python refuses int() of over 4,300 digits with a ValueError, not a YAML error
MAX_ERRORS = 50  # field errors reported at once; a body of 20,000 unknown fields gets a small answer


class _PlainLoader(yaml.SafeLoader):
    """Safe YAML restricted to plain data. No aliases: nested `*refs` expand a few hundred bytes into
    gigabytes when the spec is stored or sent on ("billion laughs"). Nesting at most MAX_DEPTH (deeper input
    overflows the recursive composer), integers of at most MAX_INT_DIGITS digits, and only JSON's types: a
    `!!binary`, `!!set` or `!!omap` value has no place in a spec and cannot be stored as JSON; a date stays the
    string it was written as."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a job spec", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        if len(node.value) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} characters (at most {MAX_INT_DIGITS})", node.start_mark
            )
        return super().construct_yaml_int(node)

    def refuse_tag(self, node: Any) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.tag} values are not allowed in a job spec (strings, numbers, booleans, lists and "
            "mappings only)", node.start_mark,
        )  # fmt: skip


_PlainLoader.add_constructor("tag:yaml.org,2002:int", _PlainLoader.construct_yaml_int)
_PlainLoader.add_constructor("tag:yaml.org,2002:timestamp", _PlainLoader.construct_yaml_str)
for _tag in ("binary", "set", "omap", "pairs"):
    _PlainLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _PlainLoader.refuse_tag)


_KEY = re.compile(r"[\w.\- :/]{1,100}")


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plain_errors(value: Any, loc: str, errors: list[dict[str, str]]) -> None:
    """What JSON cannot carry or a job should never see: non-string keys, NUL characters (they cut C strings,
    paths among them), non-finite numbers (JSON has none; stored as null they would silently change a field)."""
    if len(errors) >= MAX_ERRORS:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or not _KEY.fullmatch(k) or ".." in k:
                errors.append({"loc": loc, "msg": f"key {k!r}: keys hold letters, digits, _ . - : / and spaces, "
                               "at most 100 characters (MLflow keeps them as parameter names)"[:300]})  # fmt: skip
                continue
            _plain_errors(v, f"{loc}.{k}" if loc else k, errors)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain_errors(v, f"{loc}[{i}]", errors)
    elif isinstance(value, str):
        if "\x00" in value:
            errors.append({"loc": loc, "msg": "contains a NUL character"})
        elif not _valid_unicode(value):  # JSON's "\ud800" escapes: no UTF-8 (nor database) can store them
            errors.append({"loc": loc, "msg": "contains an unpaired surrogate (not valid Unicode)"})
    elif isinstance(value, float):
        if not math.isfinite(value):
            errors.append({"loc": loc, "msg": f"must be a finite number, got {value}"})
    elif value is not None and not isinstance(value, (bool, int)):
        errors.append({"loc": loc, "msg": f"a {type(value).__name__} is not allowed here"})


MAX_SPEC_JSON_BYTES = 96 * 1024  # a spec reaches the job as one environment variable / argument (128 KiB)


def spec_json(data: dict[str, Any]) -> str:
    """The form a spec (`model_dump(mode="json")`) travels to a job in: compact JSON, non-ASCII escaped
    (as \\uXXXX escapes), so one byte a character."""
    return json.dumps(data, separators=(",", ":"))


def pinned_model_uri(uri: str | None) -> bool:
    """True for a fixed registry version, `models:/name/<number>` (an alias may move; a path may be anything)."""
    return bool(uri) and re.fullmatch(r"models:/[^/@]+/[0-9]+", uri) is not None


def check_spec_size(spec: JobSpec) -> None:
    """Refuse a spec whose JSON form cannot reach a job: Linux caps one argument or variable at 128 KiB."""
    size = len(spec_json(spec.model_dump(mode="json")))
    if size > MAX_SPEC_JSON_BYTES:
        raise SpecError([{"loc": "", "msg": f"the spec is {size} bytes as JSON, over the limit of "
                          f"{MAX_SPEC_JSON_BYTES}: list shards in a manifest or a brace pattern instead"}])


def parse_text(text: str, source: str = "<spec>") -> Any:
    """YAML or JSON text → a Python object; a syntax error becomes a SpecError with the line."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=_PlainLoader) if d is not None]
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise SpecError([{"loc": "", "msg": f"{source} is not valid YAML/JSON: {e}"[:2000]}]) from None
    if len(docs) != 1:
        raise SpecError([{"loc": "", "msg": f"{source} must hold exactly one document, found {len(docs)}"}])
    errors: list[dict[str, str]] = []
    _plain_errors(docs[0], "", errors)
    if errors:
        raise SpecError(errors)
    return docs[0]


def load_spec(path_or_text: str | Path) -> JobSpec:
    """Load a spec from a YAML/JSON file path or from the text itself."""
    source = "<spec>"
    if isinstance(path_or_text, Path) or (
        "\n" not in path_or_text
        and not path_or_text.lstrip().startswith(("{", "["))
        and ": " not in path_or_text
    ):
        path = Path(path_or_text)
        if not path.is_file():
            raise SpecError([{"loc": "", "msg": f"spec file {str(path)!r} does not exist"}])
        text, source = path.read_text(), str(path)
    else:
        text = str(path_or_text)
    return parse_spec(parse_text(text, source))


def flatten_spec(spec: JobSpec) -> dict[str, str]:
    """Dot-keyed string values of the whole resolved spec; secrets in `data.storage_options` are redacted."""
    return _flatten(redacted(spec))


CORE_PARAMS = ("kind", "optim.steps", "optim.batch_size", "optim.lr", "resources.workers", "model.codebook_size",
               "quantizer.preset", "model.dim", "model.depth")


def upgrade_stored(data: Any) -> Any:
    """A spec the service stored before `register.alias: latest` was refused: it held 'latest', the old default,
    which set no alias (MLflow reserves the name), so it becomes null, which means the same."""
    register = data.get("register") if isinstance(data, dict) else None
    if isinstance(register, dict) and str(register.get("alias", "")).lower() == "latest":
        return {**data, "register": {**register, "alias": None}}
    return data


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


def local_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(field path, local path) for every local path the job will read or write."""
    found: list[tuple[str, str]] = []

    def add(loc: str, value: str | list[str] | None) -> None:
        values = [value] if isinstance(value, str) else list(value or [])
        for i, whole in enumerate(values):
            for v in whole.split("::"):  # webdataset joins patterns with `::`: each part is a path of its own
                m = _SCHEME.match(v)
                if not v or (m and m.group(1).lower() != "file"):
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
        if isinstance(v, str) and not _SCHEME.match(v) and not v.startswith(("/", "~")):
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


SHARED_ROOTS_ENV = "VQTRAIN_SHARED_ROOTS"  # local paths every node mounts (NFS, EFS, Lustre): fine on a cluster

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
        found.append(("checkpoint.storage", "<VQTRAIN_HOME>/checkpoints (the default)"))
    errors = [{"loc": loc, "msg": f"{path!r} {msg}: {_SHARED_INSTEAD[section(loc)]}"} for loc, path in found]
    if artifact_root and (artifact_root.startswith(("file:", "/")) or ":" not in artifact_root):
        errors.append({"loc": "tracking.experiment",
                       "msg": f"the MLflow artifact root {artifact_root!r} {msg}: {_SHARED_INSTEAD['tracking']}"})  # fmt: skip
    return errors
