"""A real multi-node Ray cluster on one machine, shaped like a production one.

One head (`--num-cpus 0`: GCS, dashboard, Jobs API and job drivers only) and worker nodes that are separate
raylets (`ray start --address ... --block`), each with its own Ray temp dir, `TMPDIR` and `VQTRAIN_HOME`,
so nothing local is shared between nodes. What the nodes do share is what a real cluster shares: the S3
endpoint (credentials in each node's environment, as an instance role or a Secret would give them), MLflow
over HTTP and the Ray Jobs API. `remove_node` kills a node's whole process tree at once (a lost VM);
`add_node` is what an autoscaler does. docs/SCALING.md gives the same commands for a rehearsal by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from service import embedded
from vqbase.local import free_ports

#: the GCS notices a lost node after period x threshold (production defaults: 3 s x 5)
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class WorkerNode:
    name: str
    folder: Path  # the node's own scratch (Ray temp dir, TMPDIR, VQTRAIN_HOME), removed with the node
    process: subprocess.Popen

    @property
    def temp_dir(self) -> str:
        return str(self.folder / "ray")


@dataclass
class Cluster:
    head: embedded.RayHead
    root: Path
    node_env: dict[str, str]
    nodes: dict[str, WorkerNode] = field(default_factory=dict)

    def add_node(self, name: str, num_cpus: int = 1) -> WorkerNode:
        """Start a worker node (`ray start --address=<head> --block`) with its own folders and ports."""
        # short: Ray's unix sockets live under the temp dir and their paths must stay under ~100 bytes
        folder = Path(tempfile.mkdtemp(prefix=f"vqnode-{name}-", dir="/tmp"))
        for sub in ("ray", "tmp", "home"):
            (folder / sub).mkdir()
        agent_http, agent_grpc, env_agent, metrics = free_ports(4)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
            "--address", self.head.gcs_address, "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(num_cpus), "--resources", json.dumps({f"vqtrain_node_{name}": 1}),
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(env_agent), "--metrics-export-port", str(metrics),
            "--temp-dir", str(folder / "ray"), "--disable-usage-stats",
            "--min-worker-port", "0", "--max-worker-port", "0",  # raylets on one IP: no shared port range
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env |= self.node_env | {"TMPDIR": str(folder / "tmp"), "VQTRAIN_HOME": str(folder / "home"),
                                "RAY_AUTH_MODE": "token"}  # fmt: skip
        log = open(folder / "node.log", "ab")  # noqa: SIM115 - the node owns it for its lifetime
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # fmt: skip
        log.close()
        node = WorkerNode(name, folder, proc)
        self.nodes[name] = node
        return node

    def remove_node(self, name: str) -> None:
        """Lose a node: SIGKILL its raylet, agents and workers (no drain, no goodbye to the GCS)."""
        node = self.nodes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        for pid in embedded._pids_mentioning(node.temp_dir):  # workers Ray started in sessions of their own
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(timeout=30)
        shutil.rmtree(node.folder, ignore_errors=True)

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes, from the dashboard's State API (what a client of the cluster sees)."""
        url = f"{self.head.address}/api/v0/nodes?limit=100&detail=true"
        req = urllib.request.Request(url, headers=embedded.ray_auth_headers())
        with urllib.request.urlopen(req, timeout=30) as r:
            nodes = json.loads(r.read())["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_for_workers(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            workers = [n for n in self.alive_nodes() if not n.get("is_head_node")]
            if len(workers) == count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(workers)} worker nodes alive after {timeout}s, wanted {count}")
            time.sleep(1)

    def stop(self) -> None:
        try:
            for name in list(self.nodes):
                self.remove_node(name)
        finally:
            self.head.stop()


@contextlib.contextmanager
def ray_cluster(root: Path, workers: int, node_env: dict[str, str]) -> Iterator[Cluster]:
    """A head with `node_env` (its job drivers inherit it) and `workers` one-CPU worker nodes."""
    (root / "head").mkdir(parents=True)
    head = embedded.start_ray_head(root / "head", num_cpus=0, env=node_env | FAST_HEALTH_CHECKS)
    cluster = Cluster(head, root, node_env)
    try:
        for i in range(workers):
            cluster.add_node(f"node-{i + 1}")
        cluster.wait_for_workers(workers)
        yield cluster
    finally:
        cluster.stop()


def in_cluster(cluster: Cluster, code: str, timeout: float = 120) -> str:
    """Run Python `code` as a separate driver connected to the cluster (this test process keeps its own Ray
    session, if any, untouched); returns its stdout."""
    prelude = f"import ray\nray.init(address={cluster.head.gcs_address!r}, log_to_driver=False)\n"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip
    if done.returncode:
        raise AssertionError(f"cluster driver failed: {done.stderr[-3000:]}")
    return done.stdout
