"""`ray job submit` of the synth job to a `ray start --head` cluster this test owns.

The cluster lives in its own temp dir and ports, and is stopped by killing exactly
the processes that carry this test's marker in their environment (`ray stop` would
kill every Ray process of the user on the machine).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cir.outputs import read_table

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MARKER = "CIR_TEST_CLUSTER"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    dash = _free_port()
    cmd = [RAY, "start", "--head", f"--temp-dir={temp_dir}", "--num-cpus=2",
           f"--port={_free_port()}", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--ray-client-server-port={_free_port()}",
           "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _kill_marked(token)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_synth_runs_under_ray_job_submit(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "out"
    cmd = [RAY, "job", "submit", f"--address={address}", "--working-dir", str(REPO),
           "--", "python", "jobs/synth.py", "--output", str(out),
           "--set", "corpus.shapes.n_images=120"]
    deadline = time.monotonic() + 600
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert time.monotonic() < deadline
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "synth finished" in log and "succeeded" in log, log[-4000:]
    triplets = read_table(out / "triplets")
    assert triplets.num_rows > 0
    assert read_table(out / "embeddings").num_rows == 120
