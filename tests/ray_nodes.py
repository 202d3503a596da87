"""Real Ray nodes on this machine: a head and worker nodes, each a `ray start --block` process with
its own temp dir, ports and resources, so a test (or a benchmark) can place work on chosen nodes and
kill one node mid-run.

Every process a node started is a descendant of its `ray start --block` process (the raylet, its
workers and agents; on the head also the GCS and the dashboard), so :meth:`RayNode.kill` SIGKILLs
exactly those, by PID: other Ray instances on the machine are left alone (no `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """One node: a `ray start --block` process (its own session, so a Ctrl-C of the test does not
    reach it) and everything it starts."""

    def __init__(self, name: str, args: list[str], env: dict, temp_dir: str):
        self.name, self.temp_dir = name, temp_dir
        self.log_path = Path(temp_dir) / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - open while the node runs
        self.proc = subprocess.Popen(["ray", "start", "--block", *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        """The `ray start` process and all its descendants, now."""
        try:
            root = psutil.Process(self.proc.pid)
            return [self.proc.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> list[int]:
        """SIGKILL the node's processes (a lost machine: nothing is told, nothing shuts down cleanly).
        Returns the PIDs killed."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        psutil.wait_procs([p for p in map(_process, pids) if p is not None], timeout=30)
        self._log.close()
        return pids

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _node_ports() -> list[str]:
    """Ports a node binds besides the head's own: each node its own, so two nodes (and other Ray
    instances on this machine) never collide on Ray's defaults."""
    return [f"--{flag}={free_port()}" for flag in (
        "node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port")]


WAIT_SCRIPT = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
want, deadline = json.loads(sys.argv[2]), time.time() + float(sys.argv[3])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    have = {name: any(name in n["Resources"] for n in alive) for name in want["resources"]}
    if len(alive) == want["nodes"] and all(have.values()):
        print(json.dumps({"nodes": len(alive)}))
        break
    if time.time() > deadline:
        sys.exit(f"after {sys.argv[3]} s: {len(alive)} alive nodes, resources {have}; wanted {want}")
    time.sleep(0.5)
"""


class LocalCluster:
    """A head node (driver side) and worker nodes on this machine, all ours.

    ``env``: the environment for clients (Ray's token auth on, one token for the cluster and its
    clients; ``RAY_ADDRESS`` the GCS). ``gcs``: the address to ``ray.init``."""

    def __init__(self, *, head_cpus: float, head_resources: dict[str, float], object_store_bytes: int = 400 * 2**20):
        self.root = tempfile.mkdtemp(prefix="raymn", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.object_store_bytes = object_store_bytes
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(16))
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []
        self.head = self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                                         f"--ray-client-server-port={free_port()}"],
                                head_cpus, head_resources)
        self.env["RAY_ADDRESS"] = self.gcs
        self.wait_for(1, list(head_resources))

    def _start(self, name: str, args: list[str], cpus: float, resources: dict[str, float]) -> RayNode:
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir, exist_ok=True)
        node = RayNode(name, [*args, f"--num-cpus={cpus:g}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
                              f"--object-store-memory={self.object_store_bytes}", f"--temp-dir={temp_dir}",
                              "--disable-usage-stats", *_node_ports()], self.env, temp_dir)
        self.nodes.append(node)
        return node

    def add_worker(self, name: str, *, cpus: float, resources: dict[str, float], timeout_s: float = 120) -> RayNode:
        """Start a worker node that joins the head (`ray start --address=...`) and wait until it has."""
        node = self._start(name, [f"--address={self.gcs}"], cpus, resources)
        alive = sum(n.proc.poll() is None for n in self.nodes)
        self.wait_for(alive, list(resources), timeout_s=timeout_s)
        return node

    def wait_for(self, nodes: int, resources: list[str], timeout_s: float = 120) -> None:
        """Until the cluster has exactly ``nodes`` alive nodes and some node offers each of ``resources``."""
        proc = subprocess.run([sys.executable, "-c", WAIT_SCRIPT, self.gcs,
                               json.dumps({"nodes": nodes, "resources": resources}), str(timeout_s)],
                              env=self.env, capture_output=True, text=True, timeout=timeout_s + 60, check=False)
        if proc.returncode != 0:
            logs = "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in self.nodes)
            raise AssertionError(f"cluster not ready: {proc.stderr[-2000:]}\n{logs}")

    def shutdown(self) -> None:
        """Kill every node's processes (by PID), then remove the temp dirs."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None or node.pids():
                node.kill()
        shutil.rmtree(self.root, ignore_errors=True)
