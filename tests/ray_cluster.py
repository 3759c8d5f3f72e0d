"""A Ray cluster of separate nodes on this machine, owned by one test.

Each node is a `ray start` with its own temp dir and ports, so another Ray of the
machine (a developer's, the test session's own) is never touched. Every process the
cluster starts carries the cluster's token in its environment, and stopping kills
exactly those (`ray stop` would kill every Ray process of the user).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from conftest import free_ports

RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "CIR_TEST_CLUSTER"
NODE_MARKER = "CIR_TEST_NODE"     # a node's temp dir name, on each process of that node
HEAD_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port")
NODE_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                   "runtime-env-agent-port", "node-manager-port", "object-manager-port")
_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def node_ports(n: int) -> list[int]:
    """`n` free ports that no other node of this process was given: nodes that start side
    by side would otherwise race for a port one picked and has not bound yet."""
    with _ports_lock:
        while True:
            ports = free_ports(n)
            if not _handed_out.intersection(ports):
                _handed_out.update(ports)
                return ports


class LocalRayCluster:
    def __init__(self):
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, MARKER: self.token, "RAY_AUTH_MODE": "disabled",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    # Ray Data reads Parquet footers with a pool of 32 actors (one worker
                    # process each, ~2 s of CPU to start) for every read_parquet: on a few
                    # small files and 2 cores, one actor reads them as fast.
                    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dirs: list[Path] = []
        self.gcs_address = self.dashboard = None
        self._lock = threading.Lock()

    def start_head(self, num_cpus: int, resources: dict | None = None) -> None:
        ports = self._start(["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1"],
                            HEAD_PORT_FLAGS + NODE_PORT_FLAGS, num_cpus, resources)
        self.gcs_address = f"127.0.0.1:{ports['port']}"
        self.dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"

    def add_nodes(self, nodes: list[tuple[int, dict | None]]) -> None:
        """Worker nodes, (num_cpus, resources) each, their `ray start`s side by side."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(nodes)) as pool:
            started = [pool.submit(self._start, [f"--address={self.gcs_address}"], NODE_PORT_FLAGS, num_cpus,
                                   resources) for num_cpus, resources in nodes]
            for done in started:
                done.result()

    def _start(self, flags: list[str], port_flags: tuple, num_cpus: int, resources: dict | None,
               attempts: int = 2) -> dict:
        """`ray start` of one node; {port flag: port}. `ray start` gives a node's raylet 30 s
        to register with the GCS, which a loaded machine can exceed: then the node's
        processes (marked with its temp dir) are killed and it starts again, on new ports."""
        for attempt in range(attempts):
            with self._lock:
                # Short: Unix socket paths under the temp dir are limited to ~108 bytes.
                temp_dir = Path(f"/tmp/cir-node-{self.token[:6]}-{len(self.temp_dirs)}")
                self.temp_dirs.append(temp_dir)
            ports = dict(zip(port_flags, node_ports(len(port_flags))))
            cmd = [RAY, "start", *flags, f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}",
                   "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())]
            if resources:
                cmd.append(f"--resources={json.dumps(resources)}")
            started = subprocess.run(cmd, env={**self.env, NODE_MARKER: temp_dir.name}, capture_output=True,
                                     text=True, timeout=120)
            if started.returncode == 0:
                return ports
            self._kill(lambda env: env.get(NODE_MARKER) == temp_dir.name)
        raise AssertionError(f"ray start failed {attempts} times, the last:\n{started.stdout[-2000:]}\n"
                             f"{started.stderr[-3000:]}")

    def wait_for_nodes(self, n: int, timeout_s: float = 60) -> None:
        """Until `n` nodes are alive, asked of the head's state API over HTTP (a driver
        process would cost seconds to start, and make the nodes start workers for it)."""
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                alive = sum(1 for node in list_nodes(address=self.dashboard, raise_on_missing_output=False)
                            if node.state == "ALIVE")
            except Exception as exc:      # the head's dashboard is still coming up
                alive = f"no answer ({exc})"
            if alive == n:
                return
            assert time.monotonic() < deadline, f"{alive} nodes alive after {timeout_s:.0f} s, expected {n}"
            time.sleep(0.5)

    def submit(self, entrypoint: list[str], working_dir: Path, timeout_s: float = 900) -> tuple[str, str]:
        """`ray job submit` of `entrypoint`, waiting for it; (submission id, its log)."""
        submission_id = f"cir-{uuid.uuid4().hex[:10]}"
        cmd = [RAY, "job", "submit", f"--address={self.dashboard}", f"--submission-id={submission_id}",
               "--working-dir", str(working_dir), "--", *entrypoint]
        # The head's job agent comes up a few seconds after `ray start` returns.
        for _ in range(30):
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s, cwd=working_dir)
            log = proc.stdout + proc.stderr
            if "No available agent" not in log:
                break
            submission_id = f"cir-{uuid.uuid4().hex[:10]}"
            cmd[3] = f"--submission-id={submission_id}"
            time.sleep(2)
        if proc.returncode != 0:
            agent = "".join(p.read_text()[-1500:] for p in self.temp_dirs[0].glob("session_latest/logs/dashboard_agent*"))
            raise AssertionError(log[-4000:] + "\n--- dashboard agent ---\n" + agent)
        return submission_id, log

    def nodes_by_work(self, submission_id: str) -> dict[str, set[str]]:
        """{task or actor name: the node ids it ran on} for one submitted job, from Ray's
        state API (finished tasks and dead actors are kept by the GCS)."""
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors, list_tasks

        job_id = JobSubmissionClient(self.dashboard).get_job_info(submission_id).job_id
        where: dict[str, set[str]] = defaultdict(set)
        for task in list_tasks(address=self.dashboard, filters=[("job_id", "=", job_id)], limit=10_000,
                               detail=True, raise_on_missing_output=False):
            if task.node_id:
                where[task.name].add(task.node_id)
        for actor in list_actors(address=self.dashboard, filters=[("job_id", "=", job_id)], limit=10_000,
                                 detail=True, raise_on_missing_output=False):
            if actor.node_id:
                where[actor.class_name].add(actor.node_id)
        return dict(where)

    def node_names(self) -> dict[str, str]:
        """{node id: "head", or the custom resource the node was started with}."""
        from ray.util.state import list_nodes

        names = {}
        for node in list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False):
            custom = [r for r in node.resources_total if r not in ("CPU", "GPU", "memory", "object_store_memory")
                      and not r.startswith("node:") and not r.startswith("accelerator_type")]
            names[node.node_id] = "head" if node.is_head_node else (custom[0] if custom else node.node_id)
        return names

    def stop(self) -> None:
        self._kill(lambda env: env.get(MARKER) == self.token)
        for temp_dir in self.temp_dirs:
            subprocess.run(["rm", "-rf", str(temp_dir)], check=False)

    @staticmethod
    def _kill(which) -> None:
        """SIGKILL every process whose environment `which` accepts, and wait for them."""
        import psutil

        killed = []
        for proc in psutil.process_iter():
            try:
                if which(proc.environ()):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        psutil.wait_procs(killed, timeout=30)   # before removing the folders they write to
