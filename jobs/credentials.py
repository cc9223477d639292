"""Credentials never travel in a job spec: the check that refuses them, and value-based redaction.

A spec is stored by the service, shown by its API (to read-only tokens too), logged to MLflow (which has
no auth) and handed to Ray as job info, so a secret in it leaks everywhere the spec goes. Jobs read
storage credentials from their nodes instead: the environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, set from a Kubernetes Secret or the like) or an instance
role / workload identity. Torch-free, stdlib only: the service and the CLI import it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

HOW_INSTEAD = (
    "credentials never go in a spec (specs are stored, shown by the API and logged to MLflow); remove it "
    "and give the cluster's nodes the credentials instead: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
    "AWS_SESSION_TOKEN in their environment (e.g. from a Kubernetes Secret), or an instance role / workload "
    "identity"
)
MASK = "***"
_MAX_DEPTH = 64  # deeper input is refused by the parser anyway; never recurse without bound here

# a storage-option key is secret-looking when its squashed form (lower case, only [a-z0-9]) contains one of
# these, or one of its words (split at _ - . and camelCase) is in _SECRET_WORDS
_SECRET_PARTS = ("secret", "passw", "pwd", "credential", "authoriz", "token", "apikey", "accesskey",
                 "accountkey", "privatekey", "cookie", "connectionstring", "signature")  # fmt: skip
_SECRET_WORDS = {"auth", "sig", "sas", "private", "passwd"}
# "key" names a secret as the key's last word (`key`, `sse_customer_key`, `key_id`), not as a prefix (`key_prefix`)
_KEY_ENDINGS = (["key"], ["keyid"], ["key", "id"])
_NOT_SECRET = {"signatureversion", "ssekmskeyid"}  # botocore's config_kwargs / S3 extra args, not secrets
_TOKEN_MODES = {"anon", "google_default", "cloud", "cache", "browser"}  # gcsfs `token=` modes, not tokens

_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])")
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_VALUE_PATTERNS = (
    (_AWS_KEY_ID, "an AWS access key id"),
    (re.compile(r"^\s*(?:Bearer|Basic|Token|Digest)\s+\S{6,}", re.IGNORECASE), "an Authorization header value"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{30,}"), "a GitHub token"),
    (re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}"), "a Slack token"),
    (re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{35}"), "a Google API key"),
    (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "a JSON web token"),
)
# scheme://user[:password]@ (a password may hold '/'; `host:8080/path@x` is a port and a path, not user-info)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#\s:@]*)(?::([^\s@]*))?@")
_PORT_PATH = re.compile(r"\d*/")  # `host:8080/path@x`: a port then a path; `user:12345678@host` is a password
_PARAM = re.compile(r"(^|[?&;])([A-Za-z0-9_.\-]+)=([^&#;\s]*)")


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def secret_key(key: Any) -> bool:
    """Whether a mapping key (storage option, header, query parameter) names a credential."""
    text = str(key)
    squashed = re.sub(r"[^a-z0-9]", "", text.lower())
    if squashed in _NOT_SECRET:
        return False
    words = _words(text)
    if any(words[-len(end):] == end for end in _KEY_ENDINGS):
        return True
    return any(p in squashed for p in _SECRET_PARTS) or any(w in _SECRET_WORDS for w in words)


def _holds_value(key: Any, value: Any) -> bool:
    if value is None or isinstance(value, bool) or value in ("", [], {}):
        return False
    return not (re.sub(r"[^a-z]", "", str(key).lower()) == "token" and value in _TOKEN_MODES)


def _token_like(text: str) -> bool:
    return len(text) >= 16 and bool(re.search(r"[A-Za-z]", text)) and bool(re.search(r"[0-9]", text))


def value_problems(text: str) -> Iterator[str]:
    """What in one string value looks like a credential (descriptions only, never the value itself)."""
    for pattern, what in _VALUE_PATTERNS:
        if pattern.search(text):
            yield f"looks like {what}"
    for m in _USERINFO.finditer(text):
        user, password = m.group(2), m.group(3)
        if password is not None and _PORT_PATH.match(password):
            continue
        if password:
            yield f"a {m.group(1)}:// URL carries user:password"
        elif _token_like(user) or any(p.search(user) for p, _ in _VALUE_PATTERNS):
            yield f"a {m.group(1)}:// URL carries a token as its user-info"
    for m in _PARAM.finditer(text):
        if m.group(3) and secret_key(m.group(2)):
            yield f"carries a {m.group(2)}= parameter (a signature, token or key)"


def _walk(value: Any, path: str, depth: int = 0) -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) for every value under `value`; key is None for list items and the root."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            yield sub, k, v
            yield from _walk(v, sub, depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            sub = f"{path}[{i}]"
            yield sub, None, v
            yield from _walk(v, sub, depth + 1)


def _storage_options(data: Any) -> Any:
    section = data.get("data") if isinstance(data, Mapping) else None
    return section.get("storage_options") if isinstance(section, Mapping) else None


def credential_errors(data: Any) -> list[dict[str, str]]:
    """Field errors (`{"loc", "msg"}`) for every credential in a spec document (before or after validation):
    a value under a secret-looking key in `data.storage_options`, user:password or a token in any URL, a
    signed URL's signature, or a string shaped like a known credential anywhere."""
    errors: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(loc: str, msg: str) -> None:
        if loc not in seen:
            seen.add(loc)
            errors.append({"loc": loc, "msg": f"{msg}: {HOW_INSTEAD}"})

    options = _storage_options(data)
    hidden: set[str] = set()  # paths under a refused key: one error for the key is enough
    for loc, key, value in _walk(options, "data.storage_options"):
        if any(loc.startswith(h + ".") or loc.startswith(h + "[") for h in hidden):
            continue
        if key is not None and secret_key(key) and _holds_value(key, value):
            add(loc, f"{key!s} looks like a credential (a secret-looking storage option)")
            hidden.add(loc)
    strings = [(loc, v) for loc, _, v in _walk(data, "") if isinstance(v, str)]
    key_id = any(_AWS_KEY_ID.search(v) for _, v in strings)
    for loc, text in strings:
        if any(loc.startswith(h + ".") or loc.startswith(h + "[") or loc == h for h in hidden):
            continue
        problems = list(value_problems(text))
        if key_id and not problems and "://" not in text and _AWS_SECRET.search(text):
            problems.append("looks like an AWS secret access key (next to an access key id)")
        if problems:
            add(loc, "; ".join(dict.fromkeys(problems)))
    return errors


def redact_text(text: str) -> str:
    """`text` with URL user-info, secret query parameters and credential-shaped values replaced by '***'."""
    for pattern, _ in _VALUE_PATTERNS:
        if pattern.search(text):
            return MASK
    text = _USERINFO.sub(
        lambda m: m.group(0) if m.group(3) is not None and _PORT_PATH.match(m.group(3)) else f"{m.group(1)}://{MASK}@",
        text,
    )
    return _PARAM.sub(
        lambda m: f"{m.group(1)}{m.group(2)}={MASK}" if m.group(3) and secret_key(m.group(2)) else m.group(0), text
    )


def _redact(value: Any, by_key: bool, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        return MASK
    if isinstance(value, Mapping):
        return {
            k: MASK if by_key and secret_key(k) and v is not None else _redact(v, by_key, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, by_key, depth + 1) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def redact_spec(data: dict[str, Any]) -> dict[str, Any]:
    """A spec's JSON form for showing (API, MLflow): any value under a secret-looking key in
    `data.storage_options` masked whatever its type, and every string redacted by `redact_text`."""
    out = _redact(data, by_key=False)
    section = out.get("data") if isinstance(out, dict) else None
    if isinstance(section, dict) and isinstance(section.get("storage_options"), dict):
        section["storage_options"] = _redact(data["data"]["storage_options"], by_key=True)
    return out
