"""The contract between a job (`python -m jobs.run`) and whoever starts it (the service through Ray Jobs,
`vqtrain run`, the tests): how the spec travels, what the job prints, which environment it reads.

A job prints `VQTRAIN_PROGRESS {json}` lines while it trains (rank 0's step, metrics and rate) and ends
with one `VQTRAIN_RESULT {json}` line (the model URI, the run, the final metrics). Its own failures are one
`vqtrain: <message>` line, or `invalid job spec:` followed by indented field errors. `parse_logs` reads all
of that back from a job's log, `parse_line` one line of it as it comes.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROGRESS_PREFIX = "VQTRAIN_PROGRESS "
RESULT_PREFIX = "VQTRAIN_RESULT "
FAILURE_PREFIX = "vqtrain: "
SPEC_ERROR_HEADER = "invalid job spec:"

# environment names: set by the starter, read by the job (or, for the service's own, by the service)
SPEC_ENV = "VQTRAIN_SPEC_JSON"  # the spec's JSON text (never in argv: /proc/<pid>/cmdline is world-readable)
JOB_ID_ENV = "VQTRAIN_JOB_ID"  # the service's job id; the MLflow run is found again by it
USER_ENV = "VQTRAIN_USER"  # who submitted: the MLflow run's "Created by"
HOME_ENV = "VQTRAIN_HOME"  # local state: job store, tokens, embedded servers, default checkpoints
ALLOWED_ROOTS_ENV = "VQTRAIN_ALLOWED_ROOTS"  # local roots a job's data paths must stay under (JSON list)
SHARED_ROOTS_ENV = "VQTRAIN_SHARED_ROOTS"  # local paths every node mounts (NFS, EFS, Lustre): fine on a cluster
RAY_ADDRESS_ENV = "VQTRAIN_RAY_ADDRESS"  # the Ray cluster (or, for the service, its Jobs API)
MLFLOW_URI_ENV = "VQTRAIN_MLFLOW_URI"  # the CLI's MLflow server, before MLFLOW_TRACKING_URI
TEST_HOOK_PREFIX = "VQTRAIN_TEST_"  # fault injection for the tests, passed to every worker

MAX_SPEC_JSON_BYTES = 96 * 1024  # Linux caps one environment variable or argument at 128 KiB


def spec_json(data: Mapping[str, Any]) -> str:
    """The spec's transport form: compact JSON, ASCII only (every non-ASCII character as \\uXXXX), so its
    length in bytes is its length in characters."""
    return json.dumps(data, separators=(",", ":"))


def spec_env(data: Mapping[str, Any]) -> dict[str, str]:
    """The environment that carries a spec to `python -m jobs.run --spec-env VQTRAIN_SPEC_JSON`."""
    return {SPEC_ENV: spec_json(data)}


def read_spec_env(name: str = SPEC_ENV, environ: Mapping[str, str] | None = None) -> str | None:
    """The spec text a starter put in `$name`, None when unset or empty."""
    text = (os.environ if environ is None else environ).get(name)
    return text if text and text.strip() else None


def entrypoint(python: str, job_id: str) -> str:
    """The shell command that runs one job. The spec travels in `$VQTRAIN_SPEC_JSON`, which the job reads
    itself: it is never expanded into the command (Ray prints that into the job log, and a process's
    arguments are readable by every user of the node)."""
    return f"{shlex.quote(python)} -m jobs.run --job-id {shlex.quote(job_id)} --spec-env {SPEC_ENV}"


def line(prefix: str, item: Mapping[str, Any]) -> str:
    """One protocol line: the prefix, then the record as compact JSON on the same line."""
    return prefix + json.dumps(item, separators=(",", ":"))


def progress_line(item: Mapping[str, Any]) -> str:
    return line(PROGRESS_PREFIX, item)


def result_line(item: Mapping[str, Any]) -> str:
    return line(RESULT_PREFIX, item)


@dataclass
class LogReport:
    """What a job's own output says about it."""

    progress: dict[str, Any] | None = None  # the newest progress record
    first_progress: dict[str, Any] | None = None  # the first record of the newest attempt (for the rate)
    result: dict[str, Any] | None = None
    failure: str | None = None


def _json_after(text: str, prefix: str) -> dict[str, Any] | None:
    at = text.find(prefix)
    if at < 0:
        return None
    try:
        value = json.loads(text[at + len(prefix):])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_line(text: str) -> tuple[str, dict[str, Any]] | None:
    """("progress" | "result", its record) for one protocol line (also behind other text, as Ray prefixes
    worker output), None for any other line or a record that is not a JSON object."""
    for kind, prefix in (("progress", PROGRESS_PREFIX), ("result", RESULT_PREFIX)):
        if prefix in text:
            item = _json_after(text, prefix)
            return (kind, item) if item is not None else None
    return None


def parse_logs(text: str) -> LogReport:
    """The latest progress, the result, and the job's own error message (`vqtrain: …` or a spec error).
    Prefixes may follow other text on a line (Ray prefixes worker output with its process name)."""
    report = LogReport()
    lines = text.splitlines()
    for i, raw in enumerate(lines):
        parsed = parse_line(raw)
        if parsed is not None and parsed[0] == "progress":
            item = parsed[1]
            if report.first_progress is None or item.get("step", 0) < (report.progress or {}).get("step", 0):
                report.first_progress = item  # (re)started: a restart from a checkpoint resets the rate
            report.progress = item
        elif parsed is not None:
            report.result = parsed[1]
        elif raw.startswith(SPEC_ERROR_HEADER):
            details = [d.strip() for d in lines[i + 1:][:20] if d.startswith("  ")]
            report.failure = " ".join([raw.strip(), *details])
        elif raw.startswith(FAILURE_PREFIX) and report.failure is None:
            report.failure = raw.removeprefix(FAILURE_PREFIX).strip()
    return report


def parse_roots(text: str) -> list[str]:
    """Allowed local data roots from their environment form, `VQTRAIN_ALLOWED_ROOTS`: a JSON list
    (`["/data", "/scratch"]`) or paths joined by os.pathsep (`/data:/scratch`). The one parser of that
    variable: the service's settings and the jobs it starts read it alike."""
    text = text.strip()
    if text.startswith("["):
        try:
            roots = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{ALLOWED_ROOTS_ENV}: not a JSON list of paths: {e}") from None
        if not all(isinstance(r, str) for r in roots):
            raise ValueError(f"{ALLOWED_ROOTS_ENV}: the JSON list must hold path strings, got {roots!r}")
        return [r for r in roots if r.strip()]
    return [r.strip() for r in text.split(os.pathsep) if r.strip()]


def allowed_roots_from_env(environ: dict[str, str] | None = None) -> list[str] | None:
    """The roots a job's local data paths must stay under: set by the service that started the job
    (its configured roots), None when unset or empty (a job run by hand reads any local path)."""
    text = (os.environ if environ is None else environ).get(ALLOWED_ROOTS_ENV, "")
    return parse_roots(text) if text.strip() else None
