"""Real servers for integration tests, bound to 127.0.0.1 on free ports, stopped by their fixtures.

Shared by the suite's fixtures (tests/conftest.py); nothing here sets global state (no env vars).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from collections.abc import Iterator

#: moto accepts any credentials; these are passed explicitly, never via the environment.
S3_KEY, S3_SECRET = "testing", "testing"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for servers that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """Run moto's S3-compatible HTTP server in a thread on 127.0.0.1:<random port>; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    access_log = logging.getLogger("werkzeug")  # one INFO line per request would flood failure reports
    level = access_log.level
    access_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        access_log.setLevel(level)


def s3_storage_options(endpoint_url: str) -> dict[str, str]:
    """The storage options a job would carry for this endpoint."""
    return {"endpoint_url": endpoint_url, "key": S3_KEY, "secret": S3_SECRET}


def make_bucket(endpoint_url: str, prefix: str = "test") -> str:
    """Create a fresh bucket on the endpoint; returns `s3://name`."""
    import s3fs

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint_url, key=S3_KEY, secret=S3_SECRET)
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"
