"""Embedded servers: a local MLflow tracking server and a local Ray head, started on demand and reused.

Torch-free and dependency-light (stdlib only) because the CLI, the service, the jobs and other
packages' tests all call it. State lives in `VQTRAIN_HOME` (default `~/.vqtrain`): each detached
server is recorded in a small JSON file (pid + URLs) and reused while it answers over HTTP.

Ray heads get their own `--temp-dir`, so a bare `ray.init()` elsewhere on the machine does not
auto-connect to them, and every port is picked free, so several heads can coexist. They are stopped
by signalling their own `ray start --block` process, never with `ray stop` (which kills every Ray
on the machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MLFLOW_STATE = "mlflow.json"
RAY_STATE = "ray.json"
_KEEP: list[subprocess.Popen] = []  # detached children stay referenced while this process lives
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


def vqtrain_home() -> Path:
    """`$VQTRAIN_HOME` or `~/.vqtrain`, created on first use (0700: it holds the store and tokens)."""
    home = Path(os.environ.get("VQTRAIN_HOME") or "~/.vqtrain").expanduser().resolve()
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


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_http(
    url: str, proc: subprocess.Popen | None, log: Path, what: str, timeout: float, headers: dict | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url, headers=headers):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; log {log}:\n{_log_tail(log)}")
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f}s; log {log}:\n{_log_tail(log)}")


def _stop_group(proc_or_pid: subprocess.Popen | int, timeout: float = 20.0) -> None:
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
def _locked(home: Path, name: str) -> Iterator[None]:
    """Serialise ensure_* across processes (two CLIs starting at once must not start two servers)."""
    with open(home / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_state(path: Path, state: dict) -> None:
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
            _stop_group(self.process)


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
    _KEEP.append(proc)
    url = f"http://{host}:{port}"
    try:
        _wait_http(f"{url}/health", proc, log, "mlflow server", timeout)
    except BaseException:
        _stop_group(proc)
        raise
    return MlflowServer(url=url, process=proc, log_path=log)


def ensure_mlflow(home: Path | None = None) -> str:
    """The URL of the embedded MLflow server in `home`, starting a detached one if none answers."""
    home = Path(home) if home else vqtrain_home()
    home.mkdir(parents=True, exist_ok=True)
    state_path = home / MLFLOW_STATE
    with _locked(home, "mlflow"):
        state = _read_state(state_path)
        if state and http_ok(f"{state['url']}/health"):
            return state["url"]
        server = start_mlflow_server(home / "mlflow")
        assert server.process is not None
        _write_state(state_path, {"pid": server.process.pid, "url": server.url})
        return server.url


def stop_mlflow(home: Path | None = None) -> bool:
    """Stop the embedded MLflow server recorded in `home`; False if none was recorded and alive."""
    home = Path(home) if home else vqtrain_home()
    state = _read_state(home / MLFLOW_STATE)
    if not state or not pid_alive(state["pid"]):
        return False
    _stop_group(state["pid"])
    (home / MLFLOW_STATE).unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------------------------------- Ray


@dataclass
class RayHead:
    """A local Ray head: `address` is the dashboard / Jobs API URL, `gcs_address` what `ray.init` takes."""

    address: str
    gcs_address: str
    temp_dir: str
    pid: int
    process: subprocess.Popen | None = field(default=None, repr=False)

    def stop(self) -> None:
        _stop_jobs(self.address)
        _stop_ray(self.process if self.process is not None else self.pid, self.temp_dir)


def _stop_jobs(address: str, timeout: float = 15.0) -> None:
    """Stop the head's running Ray jobs through its Jobs API first, so that Ray ends their entrypoint
    processes (which would otherwise outlive the head as orphans)."""
    headers = {**ray_auth_headers(), "Content-Type": "application/json"}
    try:
        req = urllib.request.Request(f"{address}/api/jobs/", headers=headers)
        with urllib.request.urlopen(req, timeout=5) as r:
            jobs = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return
    live = [j["submission_id"] for j in jobs if j.get("status") in ("PENDING", "RUNNING") and j.get("submission_id")]
    for sid in live:
        req = urllib.request.Request(f"{address}/api/jobs/{sid}/stop", data=b"", headers=headers, method="POST")
        with contextlib.suppress(urllib.error.URLError, OSError):
            urllib.request.urlopen(req, timeout=5).close()
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/", headers=headers), timeout=5) as r:
                live = [j["submission_id"] for j in json.loads(r.read()) if j.get("status") in ("PENDING", "RUNNING")]
        except (urllib.error.URLError, OSError, ValueError):
            return


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (Linux /proc; empty elsewhere)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def _stop_ray(proc_or_pid: subprocess.Popen | int, temp_dir: str | None) -> None:
    """Stop a head we started, then any of its workers that Ray started in their own sessions
    (recognised by the head's private temp dir in their command line)."""
    _stop_group(proc_or_pid, timeout=30.0)
    if not temp_dir:
        return
    leftovers = _pids_mentioning(f"{temp_dir}/session_")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in leftovers):
            time.sleep(0.2)


def _ray_token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ray_auth_token() -> str | None:
    """Ray's cluster token as its clients find it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = _ray_token_path()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def ray_auth_headers() -> dict[str, str]:
    """Headers for Ray's dashboard / Jobs API; harmless against clusters without token auth."""
    token = ray_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _ensure_ray_token() -> None:
    """Embedded heads use Ray token auth (the GCS listens on the node IP); create Ray's default token file,
    0600, and make an existing one 0600 (the token gives control of every job on the head)."""
    if not os.environ.get("RAY_AUTH_TOKEN") and _ray_token_path().is_file():
        private_file(_ray_token_path())
    if ray_auth_token():
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))


def _ray_temp_dir(home: Path) -> Path:
    # Ray puts unix sockets under the temp dir; their paths must stay under ~100 bytes.
    candidate = home / "ray"
    if len(str(candidate)) <= 40:
        return candidate
    return Path("/tmp") / f"vqray-{hashlib.sha1(str(home).encode()).hexdigest()[:10]}"


def start_ray_head(
    home: Path | None = None,
    num_cpus: int | None = None,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> RayHead:
    """Start `ray start --head --block` detached, on free ports, and wait for the Jobs API. `num_cpus=0`
    makes a head that schedules no training (a cluster's head); `env` is added to the head's environment
    (which its job drivers inherit)."""
    home = Path(home) if home else vqtrain_home()
    temp_dir = _ray_temp_dir(home)
    temp_dir.mkdir(parents=True, exist_ok=True)
    host = "127.0.0.1"
    gcs_port, dash_port, client_port, agent_http, agent_grpc, env_agent, metrics = free_ports(7)
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", host, "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", host, "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(client_port),
        "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(env_agent),
        "--metrics-export-port", str(metrics),
        "--num-cpus", str(num_cpus if num_cpus is not None else os.cpu_count() or 1),
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]  # fmt: skip
    # no drain-on-SIGTERM wait (a Serve feature): stop() should end the head in seconds
    env = {**os.environ, **(env or {}), "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env = without_service_secrets(env)  # the head's environment reaches every job driver it starts
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_AUTH_MODE", "token")  # an explicit RAY_AUTH_MODE=disabled is respected
    if env["RAY_AUTH_MODE"] == "token":
        _ensure_ray_token()
    log = home / "ray-head.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    _KEEP.append(proc)
    address = f"http://{host}:{dash_port}"
    try:
        _wait_http(f"{address}/api/version", proc, log, "ray head", timeout, ray_auth_headers())
        _wait_http(f"{address}/api/jobs/", proc, log, "ray jobs API", timeout, ray_auth_headers())
    except BaseException:
        _stop_group(proc)
        raise
    return RayHead(address, f"{host}:{gcs_port}", str(temp_dir), proc.pid, proc)


def ensure_ray(address: str | None = None, home: Path | None = None, num_cpus: int | None = None) -> str:
    """The Ray Jobs API address: `address` if configured, else a running local head, else a new one."""
    if address:
        return address
    home = Path(home) if home else vqtrain_home()
    home.mkdir(parents=True, exist_ok=True)
    state_path = home / RAY_STATE
    with _locked(home, "ray"):
        state = _read_state(state_path)
        if (
            state
            and pid_alive(state["pid"])
            and http_ok(f"{state['address']}/api/version", headers=ray_auth_headers())
        ):
            return state["address"]
        head = start_ray_head(home, num_cpus=num_cpus)
        _write_state(
            state_path,
            {
                "pid": head.pid,
                "address": head.address,
                "gcs_address": head.gcs_address,
                "temp_dir": head.temp_dir,
            },
        )
        return head.address


def ray_state(home: Path | None = None) -> dict | None:
    """The recorded local head (`address`, `gcs_address`, `pid`, `temp_dir`), if any."""
    return _read_state((Path(home) if home else vqtrain_home()) / RAY_STATE)


def stop_ray(home: Path | None = None) -> bool:
    """Stop the local head recorded in `home` (only that one); False if none was running."""
    home = Path(home) if home else vqtrain_home()
    state = _read_state(home / RAY_STATE)
    if not state or not pid_alive(state["pid"]):
        return False
    _stop_jobs(state["address"])
    _stop_ray(state["pid"], state.get("temp_dir"))
    (home / RAY_STATE).unlink(missing_ok=True)
    return True
