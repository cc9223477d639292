"""The embedded local Ray head, started on demand and reused (the local MLflow server: `vqbase.local`).

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
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vqbase.local import (
    free_ports,
    http_ok,
    keep,
    locked,
    pid_alive,
    private_file,
    read_state,
    stop_group,
    vqtrain_home,
    wait_http,
    without_service_secrets,
    write_state,
)

RAY_STATE = "ray.json"


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
    stop_group(proc_or_pid, timeout=30.0)
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
    keep(proc)
    address = f"http://{host}:{dash_port}"
    try:
        wait_http(f"{address}/api/version", proc, log, "ray head", timeout, ray_auth_headers())
        wait_http(f"{address}/api/jobs/", proc, log, "ray jobs API", timeout, ray_auth_headers())
    except BaseException:
        stop_group(proc)
        raise
    return RayHead(address, f"{host}:{gcs_port}", str(temp_dir), proc.pid, proc)


def ensure_ray(address: str | None = None, home: Path | None = None, num_cpus: int | None = None) -> str:
    """The Ray Jobs API address: `address` if configured, else a running local head, else a new one."""
    if address:
        return address
    home = Path(home) if home else vqtrain_home()
    home.mkdir(parents=True, exist_ok=True)
    state_path = home / RAY_STATE
    with locked(home, "ray"):
        state = read_state(state_path)
        if (
            state
            and pid_alive(state["pid"])
            and http_ok(f"{state['address']}/api/version", headers=ray_auth_headers())
        ):
            return state["address"]
        head = start_ray_head(home, num_cpus=num_cpus)
        write_state(
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
    return read_state((Path(home) if home else vqtrain_home()) / RAY_STATE)


def stop_ray(home: Path | None = None) -> bool:
    """Stop the local head recorded in `home` (only that one); False if none was running."""
    home = Path(home) if home else vqtrain_home()
    state = read_state(home / RAY_STATE)
    if not state or not pid_alive(state["pid"]):
        return False
    _stop_jobs(state["address"])
    _stop_ray(state["pid"], state.get("temp_dir"))
    (home / RAY_STATE).unlink(missing_ok=True)
    return True
