"""The synth, train and index jobs on a Ray cluster of a head and two worker nodes.

Three `ray start` nodes on this machine (tests/ray_cluster.py): a head with no CPUs, so
that only the jobs' drivers run there, and two 2-CPU workers told apart by a custom
resource. Each job is submitted with `ray job submit` and writes to a folder outside
every node's working directory (a job's working dir is a per-job copy). The same
commands then run on a one-node cluster of 4 CPUs, and the outputs must match: same
ids, same triplets, the same training losses, the same index. Ray's state API says
which node ran each task and actor; every job must have used both workers.

The two clusters are separate (their own ports and temp dirs) and run side by side, each
its jobs in order: most of a job's wall time on these 2 cores is processes starting and
waiting for each other, which the other cluster's work fills. The wall times printed are
each job's own, both clusters sharing the cores.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from ray_cluster import LocalRayCluster

from cir.outputs import read_table

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def synth_command(out: Path) -> list[str]:
    return ["python", "jobs/synth.py", "--output", str(out), "--set", "corpus.shapes.n_images=160",
            "--set", "encode.num_actors=2", "--set", "encode.torch_threads=1"]


def train_command(storage: Path, benchmark: Path) -> list[str]:
    # A worker asks for a whole 2-CPU node, so the two workers are on two nodes.
    return ["python", "jobs/train.py", "--config", "configs/train/tiny_test.yaml", "--storage", str(storage),
            "--set", "run.cpus_per_worker=2", "--set", "run.torch_threads=1",
            "--set", f"stages.finetune.data.benchmark_dir={benchmark}", "--set", "stages.finetune.data.limit=128",
            "--set", "run.eval_every=0"]


def index_command(gallery: Path, out: Path) -> list[str]:
    return ["python", "jobs/index.py", "--gallery", str(gallery), "--output", str(out), "--shards", "2",
            "--set", "encode.num_actors=2", "--set", "encode.torch_threads=1"]


def run_jobs(cluster: LocalRayCluster, root: Path, benchmark: Path) -> dict:
    """Submit synth, train and index; {job: (seconds, {work: node ids})}."""
    report = {}
    for job, command in (("synth", synth_command(root / "synth")),
                         ("train", train_command(root / "runs", benchmark)),
                         ("index", index_command(root / "synth", root / "index"))):
        t0 = time.perf_counter()
        submission, log = cluster.submit(command, REPO)
        assert "succeeded" in log, log[-3000:]
        report[job] = (time.perf_counter() - t0, cluster.nodes_by_work(submission))
    return report


# (num_cpus, custom resources) of the head, then of each worker node.
THREE_NODES = [(0, None), (2, {"worker_a": 1}), (2, {"worker_b": 1})]
ONE_NODE = [(4, None)]


def boot(cluster: LocalRayCluster, layout: list) -> float:
    """Start the cluster's nodes (the workers side by side) and wait for them; seconds."""
    t0 = time.perf_counter()
    cluster.start_head(*layout[0])
    if layout[1:]:
        cluster.add_nodes(layout[1:])
    cluster.wait_for_nodes(len(layout))
    return time.perf_counter() - t0


def boot_and_run(cluster: LocalRayCluster, layout: list, root: Path, benchmark: Path,
                 booted: float | None = None) -> tuple:
    """(root, report, node names, boot seconds) of the jobs on the cluster, booted first
    unless `booted` says in how many seconds it was."""
    seconds = boot(cluster, layout) if booted is None else booted
    return root, run_jobs(cluster, root, benchmark), cluster.node_names(), seconds


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory, small_benchmark):
    """{"three": (root, report, node names, boot seconds), "one": ...}. The three-node
    cluster boots first (several `ray start`s at once on a loaded machine can overrun the
    30 s a raylet gets to register), then its jobs run beside the one-node cluster's boot
    and jobs. The first failure stops both clusters (the other's job then fails at once
    instead of running on) and is raised."""
    clusters = {"three": (LocalRayCluster(), THREE_NODES, tmp_path_factory.mktemp("multinode")),
                "one": (LocalRayCluster(), ONE_NODE, tmp_path_factory.mktemp("onenode"))}
    try:
        booted = {"three": boot(*clusters["three"][:2])}
        import os
        with ThreadPoolExecutor(1 if os.environ.get("MN_SERIAL") else len(clusters)) as pool:
            futures = {name: pool.submit(boot_and_run, *clusters[name], small_benchmark, booted.get(name))
                       for name in clusters}
            done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for cluster, _, _ in clusters.values():
                    cluster.stop()
                raise failed[0].exception()
            return {name: f.result() for name, f in futures.items()}
    finally:
        for cluster, _, _ in clusters.values():
            cluster.stop()


@pytest.fixture(scope="module")
def three_node_run(cluster_runs):
    root, report, names, _ = cluster_runs["three"]
    return root, report, names


@pytest.fixture(scope="module")
def one_node_run(cluster_runs):
    root, report, _, _ = cluster_runs["one"]
    return root, report


def test_every_job_spreads_its_work_over_both_workers(three_node_run, one_node_run, cluster_runs):
    _, report, names = three_node_run
    _, single = one_node_run
    boots = {name: run[3] for name, run in cluster_runs.items()}
    print(f"\nboot: {boots['three']:.0f} s for 3 nodes, {boots['one']:.0f} s for 1; "
          "the two clusters ran side by side, sharing the cores")
    for job, (seconds, where) in report.items():
        used = {names.get(node, node) for nodes in where.values() for node in nodes}
        per_work = "; ".join(f"{work}: {'+'.join(sorted(names.get(n, n) for n in nodes))}"
                             for work, nodes in sorted(where.items()))
        print(f"\n{job}: {seconds:.0f} s on 3 nodes, {single[job][0]:.0f} s on 1. Ran on: {per_work}")
        assert {"worker_a", "worker_b"} <= used, f"{job} ran only on {used}"
    train_workers = report["train"][1].get("RayTrainWorker", set())
    assert len(train_workers) == 2, f"the two training workers shared a node: {report['train'][1]}"


def _table(folder: Path, key: str):
    table = read_table(folder)
    return table.sort_by(key)


def test_synth_outputs_equal_a_single_node_run(three_node_run, one_node_run):
    multi, single = three_node_run[0] / "synth", one_node_run[0] / "synth"
    for stage, key in (("corpus", "image_id"), ("embeddings", "image_id"), ("pairs", "pair_id"),
                       ("triplets", "triplet_id")):
        a, b = _table(multi / stage, key), _table(single / stage, key)
        print(f"\n{stage}: {a.num_rows} rows on 3 nodes, {b.num_rows} on 1")
        assert a.num_rows == b.num_rows > 0, stage
        assert a.column(key).to_pylist() == b.column(key).to_pylist(), stage
        if stage == "embeddings":
            np.testing.assert_allclose(np.stack(a.column("embedding").to_numpy(zero_copy_only=False)),
                                       np.stack(b.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-6)
        else:
            assert a.equals(b), f"{stage}: same ids, other rows"


def test_training_equals_a_single_node_run_and_its_export_loads(three_node_run, one_node_run):
    from cir.query_encoders import load_query_encoder

    histories = [json.loads((root / "runs" / "tiny" / "finetune" / "history.json").read_text())
                 for root in (three_node_run[0], one_node_run[0])]
    losses = [[h["loss"] for h in history if "loss" in h] for history in histories]
    assert losses[0] and np.allclose(losses[0], losses[1], rtol=1e-5), losses
    encoder = load_query_encoder(f"checkpoint:{three_node_run[0] / 'runs' / 'tiny' / 'finetune' / 'export'}")
    assert encoder is not None


def test_index_equals_a_single_node_run(three_node_run, one_node_run):
    manifests = [json.loads((root / "index" / "index" / "manifest.json").read_text())
                 for root in (three_node_run[0], one_node_run[0])]
    shards = [[(s["rows"], s["sha256"]) for s in m["shards"]] for m in manifests]
    assert len(shards[0]) == 2 and all(rows for rows, _ in shards[0])
    assert shards[0] == shards[1], "the shards' ids or FAISS files differ from the single-node run's"
