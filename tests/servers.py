"""Real servers for integration tests, bound to 127.0.0.1 on free ports, stopped by their fixtures.

Shared by the suite's fixtures (tests/conftest.py); nothing here sets global state (no env vars).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
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


def _postgres_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # Debian keeps them off PATH
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    raise RuntimeError(f"PostgreSQL's `{name}` not found: scripts/test installs Debian's postgresql package")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb, trust auth, C locale, fsync off) on 127.0.0.1:<free port>;
    yields its SQLAlchemy URL (psycopg 3). PostgreSQL refuses to run as root, so under root it runs as
    `postgres`. The server is stopped and its files removed however the start or the tests end."""
    initdb, pg_ctl = _postgres_tool("initdb"), _postgres_tool("pg_ctl")
    base = tempfile.mkdtemp(prefix="vqtrain-pg-")  # not under pytest's 0700 tmp root: `postgres` must enter it
    data, log = f"{base}/data", f"{base}/server.log"
    as_user: list[str] = []
    try:
        if os.geteuid() == 0:
            as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(base, "postgres")
        port = free_port()
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        try:
            subprocess.run([*as_user, initdb, "-D", data, "-A", "trust", "-U", "vqtrain", "-E", "UTF8",
                            "--locale=C", "--no-sync"], check=True, capture_output=True)  # fmt: skip
            subprocess.run([*as_user, pg_ctl, "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start"],
                           check=True, capture_output=True)  # fmt: skip
        except subprocess.CalledProcessError as e:
            server_log = open(log).read()[-2000:] if os.path.exists(log) else ""
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr.decode()[-2000:]}{server_log}") from e
        yield f"postgresql+psycopg://vqtrain@127.0.0.1:{port}/postgres"
    finally:
        if os.path.exists(f"{data}/postmaster.pid"):  # started, or a start that timed out may still be up
            subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
