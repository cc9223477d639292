"""Reading a spec: YAML/JSON text → a plain document (`parse_text`, through a hardened YAML loader) →
a validated `JobSpec` (`parse_spec`, or `load_spec` from a file or the text), plus the checks that need the
whole spec (`check_spec_size`) and the upgrade of documents the service stored under older rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.credentials import credential_errors
from jobs.spec.errors import MAX_ERRORS, SpecError, errors_from
from jobs.spec.job import JobSpec
from vqbase.protocol import MAX_SPEC_JSON_BYTES, spec_json

MAX_DEPTH = 32  # nesting levels of a spec document; a real spec uses 4
MAX_INT_DIGITS = 30  # Python refuses int() of over 4,300 digits with a ValueError, not a YAML error


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
        raise SpecError(errors_from(e, JobSpec)) from None


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


def check_spec_size(spec: JobSpec) -> None:
    """Refuse a spec whose JSON form cannot reach a job: Linux caps one argument or variable at 128 KiB."""
    size = len(spec_json(spec.model_dump(mode="json")))
    if size > MAX_SPEC_JSON_BYTES:
        raise SpecError([{"loc": "", "msg": f"the spec is {size} bytes as JSON, over the limit of "
                          f"{MAX_SPEC_JSON_BYTES}: list shards in a manifest or a brace pattern instead"}])


def upgrade_stored(data: Any) -> Any:
    """A spec the service stored before `register.alias: latest` was refused: it held 'latest', the old default,
    which set no alias (MLflow reserves the name), so it becomes null, which means the same."""
    register = data.get("register") if isinstance(data, dict) else None
    if isinstance(register, dict) and str(register.get("alias", "")).lower() == "latest":
        return {**data, "register": {**register, "alias": None}}
    return data
