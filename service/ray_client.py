"""Submission to Ray through the Ray Jobs API, so jobs outlive the service; and what the service learns
back: status, the cluster's shape, and the job's logs (their `VQTRAIN_PROGRESS` / `VQTRAIN_RESULT` lines are
read by `vqbase.protocol.parse_logs`).

The entry point (`vqbase.protocol.entrypoint`) is `<python> -m jobs.run --job-id ID --spec-env
VQTRAIN_SPEC_JSON` run by the service's own interpreter (a bare `python` on a Ray node may lack torch);
`settings.runtime_env` adds to it for clusters whose nodes need a working_dir, pip packages or an image.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from service import embedded
from vqbase.local import without_service_secrets

STATE_OF_RAY = {
    "PENDING": "queued",
    "RUNNING": "running",
    "SUCCEEDED": "succeeded",
    "FAILED": "failed",
    "STOPPED": "cancelled",
}


class RayUnavailable(RuntimeError):
    """The Ray Jobs API did not answer; jobs stay as they are in the store until it does."""


class RaySubmitRejected(RuntimeError):
    """Ray refused a submission as invalid (HTTP 4xx, or the client's own checks): retrying cannot help."""


class RayJobNotFound(LookupError):
    """Ray has no job with this submission id (not submitted yet, or its head was replaced)."""


@dataclass
class RayJobInfo:
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str | None
    start_time: float | None  # unix seconds
    end_time: float | None


def eta_seconds(first: dict[str, Any] | None, last: dict[str, Any] | None) -> float | None:
    """Seconds left at the step rate between two progress records of one attempt, from their `time`
    stamps (unix seconds, taken on rank 0, so eval and checkpoint pauses count as they will again);
    0 once the last step is reached; None without two timed records that advanced."""
    if not first or not last:
        return None
    step, total, t1 = last.get("step"), last.get("total"), last.get("time")
    step0, t0 = first.get("step"), first.get("time")
    if not all(isinstance(v, int | float) for v in (step, total, t1, step0, t0)):
        return None
    if total and step >= total:
        return 0.0
    if not total or step <= step0 or t1 <= t0:
        return None
    rate = (step - step0) / (t1 - t0)
    return round((total - step) / rate, 1)


SHAPE_TTL_S = 30.0


def cluster_nodes(address: str) -> list[dict[str, Any]] | None:
    """The live nodes of the Ray cluster behind this Jobs API address, as `{"head": bool, "resources":
    {...}}`, from its State API; None when it does not answer (or the address is no Jobs API)."""
    if not address.lower().startswith(("http://", "https://")):
        return None
    url = f"{address.rstrip('/')}/api/v0/nodes?limit=10000&detail=true"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=embedded.ray_auth_headers()), timeout=5) as r:
            nodes = json.loads(r.read())["data"]["result"]["result"]
        return [{"head": bool(n.get("is_head_node")), "resources": dict(n.get("resources_total") or {})}
                for n in nodes if n.get("state") == "ALIVE"]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cluster_spread(nodes: list[dict[str, Any]]) -> bool:
    """True when a job's workers may run on another machine than its driver: several live nodes, or a head
    with no CPU (workers then come from nodes an autoscaler adds)."""
    head_cpus = sum(float(n["resources"].get("CPU", 0)) for n in nodes if n["head"])
    return len(nodes) > 1 or head_cpus == 0


def capacity_errors(resources: dict[str, Any], nodes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Field errors when the live nodes can never hold the job's workers at once (each worker's CPUs and
    GPUs on one node): such a job would wait for resources forever while holding a slot."""
    def units(x: Any) -> int:  # Ray's fixed point (1e-4): 10 x 0.1 CPU fit in 1 CPU, as floats they do not
        return round(float(x) * 10_000)

    cpus, gpus, workers = float(resources["cpus_per_worker"]), float(resources["gpus_per_worker"]), resources["workers"]
    fits = 0
    for n in nodes:
        have_cpu, have_gpu = units(n["resources"].get("CPU", 0)), units(n["resources"].get("GPU", 0))
        fits += min(have_cpu // units(cpus), have_gpu // units(gpus) if gpus else workers)
    if fits >= workers:
        return []
    most_gpus = max((float(n["resources"].get("GPU", 0)) for n in nodes), default=0.0)
    most_cpus = max((float(n["resources"].get("CPU", 0)) for n in nodes), default=0.0)
    if gpus > most_gpus:
        loc, msg = "resources.gpus_per_worker", f"no node of the cluster has {gpus:g} GPUs (the most is {most_gpus:g})"
    elif cpus > most_cpus:
        loc, msg = "resources.cpus_per_worker", f"no node of the cluster has {cpus:g} CPUs (the most is {most_cpus:g})"
    else:
        loc, msg = "resources.workers", f"the cluster holds {fits} such workers at once, not {workers}"
    return [{"loc": loc, "msg": msg + "; ask for less, or set VQTRAIN_CLUSTER_AUTOSCALES=true if an autoscaler "
             "adds nodes on demand"}]  # fmt: skip


class RayJobs:
    """A lazily connected `JobSubmissionClient` (the API keeps answering while Ray is away)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None
        self._lock = threading.Lock()
        self._nodes: tuple[float, list[dict[str, Any]] | None] | None = None

    def _get(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address, headers=embedded.ray_auth_headers())
                except Exception as e:  # connection refused, version check, auth
                    raise RayUnavailable(f"Ray Jobs API at {self.address}: {e}") from e
            return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._get()
        try:
            return getattr(client, method)(*args, **kwargs)
        except RuntimeError as e:
            text = str(e)
            # by the status Ray reports, not a bare "404" (job ids and tracebacks can contain those digits)
            if "already exists" not in text and (
                re.search(r"status code 404\b", text) or "does not exist" in text or "not found" in text.lower()
            ):
                raise RayJobNotFound(text) from e
            raise RayUnavailable(text) from e
        except Exception as e:  # requests' connection errors and the like
            raise RayUnavailable(f"Ray Jobs API at {self.address}: {e}") from e

    def nodes(self) -> list[dict[str, Any]] | None:
        """The cluster's live nodes (`cluster_nodes`), cached briefly: every submission asks."""
        now = time.monotonic()
        if self._nodes is None or now - self._nodes[0] >= SHAPE_TTL_S:
            self._nodes = (now, cluster_nodes(self.address))
        return self._nodes[1]

    def submit(self, job_id: str, command: str, env: dict[str, str], runtime_env: dict[str, Any]) -> None:
        """Submit under `job_id`; an existing Ray job with that id counts as submitted (idempotent)."""
        renv = dict(runtime_env)
        renv["env_vars"] = without_service_secrets({**runtime_env.get("env_vars", {}), **env})
        try:  # the checks Ray's client makes before sending: a bad runtime_env can never be submitted
            from ray.runtime_env import RuntimeEnv

            RuntimeEnv(**renv)
        except (ValueError, TypeError) as e:
            raise RaySubmitRejected(f"invalid runtime_env: {e}") from e
        try:
            self._call("submit_job", entrypoint=command, submission_id=job_id, runtime_env=renv,
                       entrypoint_num_cpus=0, metadata={"vqtrain_job_id": job_id})  # fmt: skip
        except RayUnavailable as e:
            if "already exists" in str(e):
                return
            if re.search(r"status code (400|413|422)\b", str(e)):  # a bad request (408/429 are transient)
                raise RaySubmitRejected(str(e)) from e
            raise

    def info(self, job_id: str) -> RayJobInfo:
        d = self._call("get_job_info", job_id)
        status = getattr(d.status, "value", str(d.status))
        start = d.start_time / 1000 if d.start_time else None
        end = d.end_time / 1000 if d.end_time else None
        return RayJobInfo(status=status, message=d.message, start_time=start, end_time=end)

    def logs(self, job_id: str) -> str:
        return self._call("get_job_logs", job_id)

    def stop(self, job_id: str) -> bool:
        try:
            return bool(self._call("stop_job", job_id))
        except RayJobNotFound:
            return False
