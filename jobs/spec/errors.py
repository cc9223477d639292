"""How a spec's problems are reported: every error names its field path (`data.train`, `quantizer.beta`, ...).

`FieldError` is what a validator raises for a field other than its own; `SpecError` is what every entry
point raises, holding one `{"loc", "msg"}` per problem; `errors_from` turns pydantic's errors into those.
"""

from __future__ import annotations

import difflib
import functools
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError

MAX_ERRORS = 50  # field errors reported at once; a body of 20,000 unknown fields gets a small answer


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


@functools.cache
def field_names(model: type[BaseModel]) -> frozenset[str]:
    """Every field name of `model` and of the sections nested in it (through unions too)."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for arg in _flat_types(info.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= field_names(arg)
    return frozenset(names)


def _flat_types(tp: Any) -> Iterable[Any]:
    args = typing.get_args(tp)
    if not args:
        yield tp
    for a in args:
        yield from _flat_types(a)


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


def errors_from(exc: ValidationError, schema: type[BaseModel]) -> list[dict[str, str]]:
    """Pydantic errors of validating `schema` → `[{"loc": "a.b", "msg": ...}]`, deduplicated, with validator
    paths resolved; an unknown field gets the nearest of `schema`'s field names as a hint."""
    known = field_names(schema)
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
            near = difflib.get_close_matches(name, known, n=1)
            if name in known:
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
