"""Fault injection and probes for the tests, switched on by `VQTRAIN_TEST_*` variables that the driver
passes to every worker (`test_hooks_from_env`): kill a rank at a step, pause every rank at given steps,
record each rank's final codebook. Without those variables every hook does nothing."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch

from vqbase.protocol import TEST_HOOK_PREFIX

if TYPE_CHECKING:
    from jobs.job import JobEnv
    from jobs.worker import Worker


def test_hooks_from_env() -> dict[str, str]:
    """Driver side: the `VQTRAIN_TEST_*` variables, passed to the workers with the loop config."""
    return {k: v for k, v in os.environ.items() if k.startswith(TEST_HOOK_PREFIX)}


def maybe_kill(step: int, worker: Worker, hooks: dict[str, str]) -> None:
    """Fault injection for the resume test: `VQTRAIN_TEST_KILL_AT_STEP=N` kills the process of rank
    `VQTRAIN_TEST_KILL_RANK` (default: the last rank) once, before step N; the marker file
    `VQTRAIN_TEST_KILL_MARKER` records that it happened so the restarted worker goes on.

    `VQTRAIN_TEST_KILL_DELAY_S` waits before dying: Ray Train registers a reported checkpoint at its next
    poll of the workers (every 2 s), and a worker that dies before that poll takes the report with it,
    so the job would restart from the checkpoint before. A test that asserts the resume step waits.
    """
    _maybe_pause(step, worker, hooks)
    at = hooks.get("VQTRAIN_TEST_KILL_AT_STEP")
    if at is None or step != int(at):
        return
    rank = int(hooks.get("VQTRAIN_TEST_KILL_RANK", worker.world_size - 1))
    marker = Path(hooks.get("VQTRAIN_TEST_KILL_MARKER", Path(tempfile.gettempdir()) / "vqtrain-kill-marker"))
    if worker.rank != rank or marker.exists():
        return
    time.sleep(float(hooks.get("VQTRAIN_TEST_KILL_DELAY_S", 0)))
    marker.write_text(f"killed rank {worker.rank} at step {step}\n")
    os._exit(1)


def _maybe_pause(step: int, worker: Worker, hooks: dict[str, str]) -> None:
    """Fault injection from outside (the cluster tests): `VQTRAIN_TEST_PAUSE_AT_STEPS=15,25` makes every rank
    write `<VQTRAIN_TEST_PAUSE_DIR>/reached-<step>-rank<r>` (its node and pid inside) before those steps and
    wait there until `release-<step>` exists, so a test can remove a node or a placement group at a known
    point of a live job."""
    steps = hooks.get("VQTRAIN_TEST_PAUSE_AT_STEPS")
    if not steps or step not in {int(s) for s in steps.split(",")}:
        return
    folder = Path(hooks["VQTRAIN_TEST_PAUSE_DIR"])
    node = ray.get_runtime_context().get_node_id()
    _write_atomic(folder / f"reached-{step}-rank{worker.rank}", json.dumps({"node": node, "pid": os.getpid()}))
    while not (folder / f"release-{step}").exists():
        time.sleep(0.2)


def record_codebook(env: JobEnv, codebook: torch.Tensor) -> None:
    """Test hook: `VQTRAIN_TEST_CODEBOOK_DIR` gets each rank's final codebook digest and node id (the cluster
    tests compare ranks that ran on different nodes)."""
    folder = env.hooks.get("VQTRAIN_TEST_CODEBOOK_DIR")
    if not folder:
        return
    import hashlib

    digest = hashlib.sha256(codebook.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    node = ray.get_runtime_context().get_node_id()
    _write_atomic(Path(folder, f"codebook-rank{env.worker.rank}"), json.dumps({"sha256": digest, "node": node}))


def _write_atomic(path: Path, text: str) -> None:
    """Whole or absent: the test polling for the file never reads half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
