"""Where shards live: URL checks, brace/prefix expansion, and fsspec opening with storage options.

Torch-free on purpose: the `vqtrain` CLI and the service import this module. Every URL that reaches
`open_url` has passed `check_url`, which refuses `pipe:` (webdataset would run it as a shell command),
schemes we do not serve, and - when the service passes `allowed_roots` - local paths outside those roots.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Sequence
from typing import IO, Any

import braceexpand
import fsspec

#: Remote schemes we open through fsspec (s3 via s3fs; gs needs gcsfs installed).
REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "http", "https"})
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_S3_KEY_ALIASES = {
    "aws_access_key_id": "key",
    "access_key": "key",
    "access_key_id": "key",
    "aws_secret_access_key": "secret",
    "secret_key": "secret",
    "secret_access_key": "secret",
    "aws_session_token": "token",
    "session_token": "token",
}


def scheme_of(url: str) -> str:
    """The URL's scheme in lower case ("pipe" for webdataset's `pipe:CMD`), or "" for a plain local path."""
    if url.lstrip().lower().startswith("pipe:"):
        return "pipe"
    head, sep, _ = url.partition("://")
    if sep:
        return head.lower()
    return ""


def is_remote(url: str) -> bool:
    """True for URLs that fsspec opens over the network (s3, gs, http)."""
    return scheme_of(url) in REMOTE_SCHEMES


def local_path(url: str) -> str:
    """The filesystem path of a local URL (`file://` stripped, `~` expanded)."""
    if scheme_of(url) == "file":
        url = url[len("file://") :]
    return os.path.expanduser(url)


def check_url(url: str, allowed_roots: Sequence[str | os.PathLike] | None = None) -> str:
    """Return `url` if we may open it, else raise ValueError naming it.

    `pipe:` runs a shell command inside webdataset, so it is never accepted; with `allowed_roots`
    (the service's configured data roots) local paths must resolve inside one of them.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"shard URL must be a non-empty string, got {url!r}")
    scheme = scheme_of(url)
    if scheme == "pipe":
        raise ValueError(f"refusing shard URL {url!r}: 'pipe:' URLs run shell commands and are not allowed")
    if scheme in REMOTE_SCHEMES:
        return url
    if scheme not in ("", "file"):
        raise ValueError(
            f"unsupported scheme {scheme!r} in shard URL {url!r}; use a local path, s3://, gs:// or http(s)://"
        )
    if allowed_roots is not None:
        real = os.path.realpath(local_path(url))
        roots = [os.path.realpath(os.path.expanduser(os.fspath(r))) for r in allowed_roots]
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            raise ValueError(f"local shard path {url!r} is outside the allowed data roots {roots}")
    return url


def s3_options(storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """s3fs keyword arguments from a job's storage options, falling back to the AWS environment.

    Accepts `endpoint_url`, `key`/`secret`/`token` and their AWS-style aliases (`aws_access_key_id`, ...) from
    library callers (a job spec may not carry them: jobs take credentials from botocore's chain, the
    `AWS_*` environment or an instance role); anything else is passed to s3fs unchanged. s3fs does not read
    `AWS_ENDPOINT_URL` itself, so we do.
    """
    opts: dict[str, Any] = {}
    for k, v in (storage_options or {}).items():
        if v is None:
            continue
        opts[_S3_KEY_ALIASES.get(k, k)] = v
    if "region" in opts or "region_name" in opts:
        region = opts.pop("region", None) or opts.pop("region_name", None)
        opts.setdefault("client_kwargs", {})["region_name"] = region
    client_kwargs = opts.get("client_kwargs") or {}
    if "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if env:
            opts["endpoint_url"] = env
    return opts


def fs_options(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec constructor options for `url`'s scheme.

    A flat options dict applies to the URL's own scheme; a dict keyed by scheme (`{"s3": {...}}`) is also
    accepted so one job can mix stores.
    """
    scheme = scheme_of(url)
    opts = dict(storage_options or {})
    nested = {k for k, v in opts.items() if k in REMOTE_SCHEMES | {"file"} and isinstance(v, dict)}
    if nested:
        opts = dict(opts.get(scheme) or opts.get({"s3a": "s3", "gcs": "gs"}.get(scheme, scheme)) or {})
    if scheme in ("s3", "s3a"):
        return s3_options(opts)
    if scheme in ("", "file"):
        return {}
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a checked URL."""
    check_url(url)
    if not is_remote(url):
        return fsspec.filesystem("file"), os.path.abspath(local_path(url))
    url = "s3://" + url[len("s3a://") :] if scheme_of(url) == "s3a" else url
    fs, path = fsspec.core.url_to_fs(url, **fs_options(url, storage_options))
    return fs, path


def open_url(
    url: str,
    mode: str = "rb",
    storage_options: dict[str, Any] | None = None,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
    block_size: int = 8 * 1024 * 1024,
) -> IO[bytes]:
    """Open a shard for streaming; remote reads use a large read-ahead block since tars are read in order."""
    check_url(url, allowed_roots)
    if not is_remote(url):
        return open(local_path(url), mode)  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(url, storage_options)
    if "r" in mode and scheme_of(url) in ("http", "https"):
        return fs.open(path, mode, block_size=0)  # plain streaming GET: no Range support needed
    if "r" in mode:
        return fs.open(path, mode, block_size=block_size, cache_type="readahead")
    return fs.open(path, mode)


def join_url(base: str, name: str) -> str:
    """`base/name` for local paths and URLs alike (name may already be absolute)."""
    if scheme_of(name) or os.path.isabs(name):
        return name
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(local_path(base), name)


def dirname_url(url: str) -> str:
    """The folder part of a local path or URL."""
    if is_remote(url):
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(local_path(url)))


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a file exists at `url` (False on permission/network trouble is not hidden: those raise)."""
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Whole small file (a manifest) as bytes."""
    with open_url(url, "rb", storage_options) as f:
        return f.read()


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a small file (a manifest) in one go; local writes go through a temp file and rename."""
    if not is_remote(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(url, storage_options)
    fs.pipe_file(path, data)


def upload_file(local: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Copy a closed local file to `url` (S3 objects are only committed once the whole file is sent)."""
    if not is_remote(url):
        dest = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        if os.path.abspath(local) != os.path.abspath(dest):
            os.replace(local, dest) if _same_device(local, dest) else _copy(local, dest)
        return
    fs, path = filesystem(url, storage_options)
    fs.put_file(local, path)


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete one file (stale shards when a shard set is remade with fewer shards)."""
    if not is_remote(url):
        os.unlink(local_path(url))
        return
    fs, path = filesystem(url, storage_options)
    fs.rm_file(path)


def _same_device(a: str, b: str) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(os.path.dirname(os.path.abspath(b))).st_dev
    except OSError:
        return False


def _copy(src: str, dest: str) -> None:
    import shutil

    tmp = dest + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; `::` joins several patterns (webdataset's convention)."""
    out: list[str] = []
    for part in pattern.split("::"):
        if part:
            out.extend(braceexpand.braceexpand(part))
    return out


def list_prefix(prefix: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Shard files under a folder, or whose name starts with `prefix`, sorted."""
    fs, path = filesystem(prefix, storage_options)
    if fs.isdir(path):
        names = [p for p in fs.ls(path, detail=False)]
    else:
        names = fs.glob(path + "*")
    names = sorted(n for n in names if n.endswith(SHARD_SUFFIXES))
    if not is_remote(prefix):
        return names
    scheme = scheme_of(prefix)
    return [n if "://" in n else f"{scheme}://{n}" for n in names]


def looks_like_pattern(source: str) -> bool:
    """True when `source` names shard files directly (braces, `::`, or a shard suffix)."""
    return "{" in source or "::" in source or source.endswith(SHARD_SUFFIXES)


def check_all(urls: Iterable[str], allowed_roots: Sequence[str | os.PathLike] | None = None) -> list[str]:
    """check_url over a list; returns the list."""
    return [check_url(u, allowed_roots) for u in urls]
