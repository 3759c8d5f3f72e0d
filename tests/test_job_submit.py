"""`ray job submit` of the synth job to a `ray start --head` cluster this test owns
(tests/ray_cluster.py: its own temp dir and ports, stopped by pid)."""
from __future__ import annotations

from pathlib import Path

import pytest
from ray_cluster import LocalRayCluster

from cir.outputs import read_table

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def head_node():
    cluster = LocalRayCluster()
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


def test_synth_runs_under_ray_job_submit(head_node, tmp_path):
    out = tmp_path / "out"
    _, log = head_node.submit(["python", "jobs/synth.py", "--output", str(out), "--set", "corpus.shapes.n_images=120"],
                              REPO, timeout_s=600)
    assert "synth finished" in log and "succeeded" in log, log[-4000:]
    triplets = read_table(out / "triplets")
    assert triplets.num_rows > 0
    assert read_table(out / "embeddings").num_rows == 120
