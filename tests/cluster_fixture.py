"""A multi-node Ray cluster on this one machine, started with `ray start` the way a real one is.

Each node is a `ray start --block` process in its own process group, with its own temp dir, ports
and resources, so a node can be lost (its raylet killed) and another added while a job runs. Every
process of the cluster carries the environment variable PANSEG_TEST_CLUSTER=<its base dir>, so
teardown stops exactly these processes and nothing of another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "PANSEG_TEST_CLUSTER"
PORTS_PER_NODE = 40  # 8 fixed ports and a worker port range


def _free_block(size: int, low: int = 20000, high: int = 30000) -> int:
    """A random run of `size` TCP ports that are free now, outside Ray's defaults and the ephemeral range."""
    for _ in range(200):
        base = random.randrange(low, high - size)
        if all(_port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports in {low}-{high}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _processes_with(marker_value: str) -> list[int]:
    """Pids whose environment holds MARKER=marker_value (this cluster's processes, any process group)."""
    needle = f"{MARKER}={marker_value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _raylet_pid(pgid: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid and (entry / "comm").read_text().strip() == "raylet":
                return int(entry.name)
        except (OSError, ProcessLookupError):
            continue
    raise RuntimeError(f"no raylet in process group {pgid}")


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path

    @property
    def pgid(self) -> int:
        return self.process.pid  # started with start_new_session: the group leader

    def raylet_pid(self) -> int:
        return _raylet_pid(self.pgid)


@dataclass
class LocalCluster:
    base: Path
    env: dict
    cpus_per_node: int
    memory_per_node: int
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # -- nodes --------------------------------------------------------------------------------

    def start_head(self) -> Node:
        b = _free_block(PORTS_PER_NODE)
        self.gcs_port, self.dashboard_port = b, b + 1
        node = self._start("head", ["--head", f"--port={b}", f"--dashboard-port={b + 1}",
                                    "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                                    f"--ray-client-server-port={b + 2}", "--disable-usage-stats"], b + 3)
        self._wait(lambda: self._get("/api/version") is not None, "the head's dashboard", node)
        self._wait(lambda: len(self.alive_nodes()) == 1, "the head node", node)
        return node

    def add_worker(self, name: str) -> Node:
        known = {n["node_id"] for n in self.alive_nodes()}
        b = _free_block(PORTS_PER_NODE)
        node = self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"], b)
        self._wait(lambda: any(n["node_id"] not in known for n in self.alive_nodes()), f"worker node {name}", node)
        return node

    def _start(self, name: str, args: list[str], b: int) -> Node:
        temp_dir = self.base / name
        log = self.base / f"{name}.log"
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", *args,
               f"--node-manager-port={b + 4}", f"--object-manager-port={b + 5}",
               f"--dashboard-agent-listen-port={b + 6}", f"--dashboard-agent-grpc-port={b + 7}",
               f"--runtime-env-agent-port={b + 8}", f"--metrics-export-port={b + 9}",
               f"--min-worker-port={b + 10}", f"--max-worker-port={b + PORTS_PER_NODE - 1}",
               f"--temp-dir={temp_dir}", f"--num-cpus={self.cpus_per_node}", f"--memory={self.memory_per_node}",
               "--object-store-memory=200000000"]
        with open(log, "wb") as out:
            process = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = Node(name, process, temp_dir, log)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the dashboard's state API (no ray.init in the test process)."""
        answer = self._get("/api/v0/nodes?limit=100&detail=true")
        if answer is None:
            return []
        return [n for n in answer["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet: the node is lost (its workers die with it; `--block` ends the rest)."""
        pid = node.raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.dashboard + path, timeout=5) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def _wait(self, ready, what: str, node: Node, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"{what} exited ({node.process.returncode}):\n{node.log.read_text()[-3000:]}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} not up after {timeout:.0f} s:\n{node.log.read_text()[-3000:]}")

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, entrypoint: list[str], cwd: Path, wait: bool = True, timeout: float = 400):
        """`ray job submit --runtime-env runtime_env.yaml --working-dir . -- ENTRYPOINT` from `cwd`."""
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={self.dashboard}",
               "--runtime-env=runtime_env.yaml", "--working-dir=.", *([] if wait else ["--no-wait"]),
               "--", *entrypoint]
        return subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, encoding="utf-8", errors="replace",
                              timeout=timeout)

    # -- teardown -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process of this cluster: each node's group, then anything left carrying the marker."""
        for node in self.nodes:
            _signal_group(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(n.process.poll() is None for n in self.nodes):
            time.sleep(0.3)
        for node in self.nodes:
            _signal_group(node.pgid, signal.SIGKILL)
            try:
                node.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):  # job drivers run in their own sessions; they carry the marker too
            left = _processes_with(str(self.base))
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_cluster(workers: int = 1, cpus_per_node: int = 1, memory_per_node: int = 4 * 2**30) -> LocalCluster:
    """A head and `workers` worker nodes, each with `cpus_per_node` CPUs; the caller must call `stop()`."""
    base = Path(tempfile.mkdtemp(prefix="psc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    env = dict(os.environ)
    env.update({
        MARKER: str(base),
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `panseg` for the job entrypoint
        # Notice a lost node in ~3 s instead of ~30 s.
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    })
    env.pop("RAY_ADDRESS", None)
    cluster = LocalCluster(base, env, cpus_per_node, memory_per_node)
    try:
        cluster.start_head()
        for i in range(workers):
            cluster.add_worker(f"worker{i + 1}")
    except BaseException:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    return cluster
