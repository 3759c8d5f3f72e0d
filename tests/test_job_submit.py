"""`ray job submit` of the synth job to a `ray start --head` cluster this test owns.

The cluster lives in its own temp dir and ports, and is stopped by killing exactly
the processes that carry this test's marker in their environment (`ray stop` would
kill every Ray process of the user on the machine).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_ports

from cir.outputs import read_table

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "CIR_TEST_CLUSTER"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _kill_marked(token: str) -> None:
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == token:
                proc.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


@pytest.fixture
def head_node(tmp_path):
    token = uuid.uuid4().hex
    env = {**os.environ, MARKER: token, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path(f"/tmp/cir-head-{token[:8]}")  # short: Unix socket paths are limited
    flags = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
             "node-manager-port", "object-manager-port")
    # Every port of its own: another Ray on the machine (a developer's, or this test
    # session's) holds the defaults, and the job agent then never comes up.
    ports = dict(zip(flags, free_ports(len(flags))))
    cmd = [RAY, "start", "--head", f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    cmd += [f"--{flag}={port}" for flag, port in ports.items()]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}"
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env, temp_dir
    finally:
        _kill_marked(token)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_synth_runs_under_ray_job_submit(head_node, tmp_path):
    address, env, temp_dir = head_node
    out = tmp_path / "out"
    cmd = [RAY, "job", "submit", f"--address={address}", "--working-dir", str(REPO),
           "--", "python", "jobs/synth.py", "--output", str(out),
           "--set", "corpus.shapes.n_images=120"]
    # The head's job agent comes up a few seconds after `ray start` returns.
    for _ in range(12):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        log = proc.stdout + proc.stderr
        if "No available agent" not in log:
            break
        time.sleep(5)
    agent_logs = "".join(p.read_text()[-1500:] for p in temp_dir.glob("session_latest/logs/dashboard_agent*"))
    assert proc.returncode == 0, log[-3000:] + "\n--- dashboard agent ---\n" + agent_logs
    assert "synth finished" in log and "succeeded" in log, log[-4000:]
    triplets = read_table(out / "triplets")
    assert triplets.num_rows > 0
    assert read_table(out / "embeddings").num_rows == 120
