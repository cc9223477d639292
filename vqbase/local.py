"""Local state and the embedded MLflow server, shared by the CLI, the service and the jobs.

`$VQTRAIN_HOME` (default `~/.vqtrain`) holds the job store, tokens, embedded servers and default checkpoints.
With no MLflow server configured, everything falls back to one local server (SQLite, proxied artifacts)
started on demand, recorded in `$VQTRAIN_HOME/mlflow.json` (pid + URL) and reused while it answers.
Stdlib only: a job started by hand, the CLI and the service all reach it without importing each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vqbase.protocol import HOME_ENV, MLFLOW_URI_ENV

MLFLOW_STATE = "mlflow.json"
_KEEP: list[subprocess.Popen] = []  # detached children stay referenced while this process lives


def keep(proc: subprocess.Popen) -> subprocess.Popen:
    """Hold a detached child for this process's life (so `stop_group` can reap it instead of leaving a zombie)."""
    _KEEP.append(proc)
    return proc


# the service's own API tokens: no child needs them, and what a Ray head inherits reaches every job
SERVICE_SECRETS = ("VQTRAIN_TOKENS", "VQTRAIN_TOKEN")


def without_service_secrets(env: dict[str, str]) -> dict[str, str]:
    """`env` without the service's API tokens (for every process the service starts, and for its jobs)."""
    return {k: v for k, v in env.items() if k not in SERVICE_SECRETS}


def private_file(path: Path) -> None:
    """Make an existing file readable by its owner only (0600); refuse one that others may read and that
    this user cannot fix."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            os.chmod(path, 0o600)
        except PermissionError:
            raise PermissionError(
                f"{path} is readable by other users (mode {mode:o}) and not ours to fix: `chmod 600 {path}`"
            ) from None


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, created 0600 (state files name pids, URLs and ports)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)  # an older leftover may have had another mode
    tmp.replace(path)


def home_path() -> Path:
    """`$VQTRAIN_HOME` or `~/.vqtrain`, as configured (not created: settings name it before anything runs)."""
    return Path(os.environ.get(HOME_ENV) or "~/.vqtrain").expanduser()


def vqtrain_home() -> Path:
    """`home_path()`, resolved and created on first use (0700: it holds the store and tokens)."""
    home = home_path().resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports (all sockets held open until every port is picked)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def http_status(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> int | None:
    """The HTTP status `url` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    """True when `url` answers 2xx."""
    status = http_status(url, timeout, headers)
    return status is not None and 200 <= status < 300


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_http(
    url: str, proc: subprocess.Popen | None, log: Path, what: str, timeout: float, headers: dict | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url, headers=headers):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; log {log}:\n{log_tail(log)}")
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f}s; log {log}:\n{log_tail(log)}")


def stop_group(proc_or_pid: subprocess.Popen | int, timeout: float = 20.0) -> None:
    """SIGTERM the process group led by this process (it was started in its own session), then SIGKILL."""
    if isinstance(proc_or_pid, int):  # our own child? then poll() can reap it instead of leaving a zombie
        proc_or_pid = next((p for p in _KEEP if p.pid == proc_or_pid), proc_or_pid)
    pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if isinstance(proc_or_pid, subprocess.Popen):
                if proc_or_pid.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.2)


@contextlib.contextmanager
def locked(home: Path, name: str) -> Iterator[None]:
    """Serialise ensure_* across processes (two CLIs starting at once must not start two servers)."""
    with open(home / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_state(path: Path, state: dict) -> None:
    write_private(path, json.dumps(state, indent=2))


# ------------------------------------------------------------------------------------------------ MLflow


@dataclass
class MlflowServer:
    """A running `mlflow server`; `stop()` ends its whole process group."""

    url: str
    process: subprocess.Popen | None
    log_path: Path | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_group(self.process)


def start_mlflow_server(
    root: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 180.0,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
) -> MlflowServer:
    """Start `mlflow server` with a SQLite backend in `root` and proxied artifacts under `root/artifacts`
    (or the given backend store, e.g. PostgreSQL, and destination, e.g. `s3://...` with its credentials in
    `env`: the production layout).

    Artifacts go through the server (`mlflow-artifacts:/`), so Ray workers and `vqtrain pull` need no
    access to this machine's filesystem. Waits until `/health` answers.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", artifacts_destination or str(root / "artifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # MLflow 3's background job runner (GenAI features) costs ~1.5 GB and startup time; not needed here.
    env = without_service_secrets({**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root, env=env,
            start_new_session=True,
        )  # fmt: skip
    keep(proc)
    url = f"http://{host}:{port}"
    try:
        wait_http(f"{url}/health", proc, log, "mlflow server", timeout)
    except BaseException:
        stop_group(proc)
        raise
    return MlflowServer(url=url, process=proc, log_path=log)


def ensure_mlflow(home: Path | None = None) -> str:
    """The URL of the embedded MLflow server in `home`, starting a detached one if none answers."""
    home = Path(home) if home else vqtrain_home()
    home.mkdir(parents=True, exist_ok=True)
    state_path = home / MLFLOW_STATE
    with locked(home, "mlflow"):
        state = read_state(state_path)
        if state and http_ok(f"{state['url']}/health"):
            return state["url"]
        server = start_mlflow_server(home / "mlflow")
        assert server.process is not None
        write_state(state_path, {"pid": server.process.pid, "url": server.url})
        return server.url


def stop_mlflow(home: Path | None = None) -> bool:
    """Stop the embedded MLflow server recorded in `home`; False if none was recorded and alive."""
    home = Path(home) if home else vqtrain_home()
    state = read_state(home / MLFLOW_STATE)
    if not state or not pid_alive(state["pid"]):
        return False
    stop_group(state["pid"])
    (home / MLFLOW_STATE).unlink(missing_ok=True)
    return True




def configured_tracking_uri(environ: Mapping[str, str] | None = None) -> str | None:
    """The MLflow server the user configured: `$VQTRAIN_MLFLOW_URI`, else `$MLFLOW_TRACKING_URI`, else None."""
    env = os.environ if environ is None else environ
    return env.get(MLFLOW_URI_ENV) or env.get("MLFLOW_TRACKING_URI") or None


def tracking_uri(environ: Mapping[str, str] | None = None) -> str:
    """The MLflow server to use: the configured one, else the embedded local server (started once and reused).
    The one place that decides it, for the CLI, the service and jobs run by hand."""
    return configured_tracking_uri(environ) or ensure_mlflow()
