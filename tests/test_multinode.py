"""The synth, train and index jobs on a Ray cluster of a head and two worker nodes.

Three `ray start` nodes on this machine (tests/ray_cluster.py): a head with no CPUs, so
that only the jobs' drivers run there, and two 2-CPU workers told apart by a custom
resource. Each job is submitted with `ray job submit` and writes to a folder outside
every node's working directory (a job's working dir is a per-job copy). Its outputs
must equal what the same settings write on the test session's one-node Ray (the
session's runs `shapes_synth`, `four_step_export` and `shapes_index`): same ids, same
triplets, the same training losses and weights, the same index. Ray's state API says
which node ran each task and actor; every job must have used both workers.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray_cluster import LocalRayCluster

from cir.outputs import read_table

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def synth_command(out: Path) -> list[str]:
    # `shapes_synth`'s settings, with two encoder actors.
    return ["python", "jobs/synth.py", "--output", str(out), "--set", "corpus.shapes.n_images=200",
            "--set", "encode.num_actors=2"]


def train_command(reference_cfg, storage: Path) -> list[str]:
    """`four_step_export`'s config with the run under `storage`. A worker asks for a whole
    2-CPU node, so the two workers are on two nodes (each one thread, as on one node).
    The run starts with the reference run's feature cache (~17 s of encoding on the
    cluster): the synth and index jobs spread the same encoder over the nodes."""
    from cir.train.run import features_folder

    cfg = replace(reference_cfg, run=replace(reference_cfg.run, storage=str(storage), cpus_per_worker=2))
    shutil.copytree(features_folder(reference_cfg), features_folder(cfg))
    config = storage.parent / "train.yaml"
    config.write_text(yaml.safe_dump(asdict(cfg)))
    return ["python", "jobs/train.py", "--config", str(config)]


def index_command(gallery: str, out: Path) -> list[str]:
    # `shapes_index`'s settings, with two encoder actors.
    return ["python", "jobs/index.py", "--gallery", str(gallery), "--output", str(out), "--shards", "2",
            "--set", "encode.num_actors=2"]


# (num_cpus, custom resources) of the head, then of each worker node.
THREE_NODES = [(0, None), (2, {"worker_a": 1}), (2, {"worker_b": 1})]


@pytest.fixture(scope="module")
def three_node_run(tmp_path_factory, four_step_export, shapes_index):
    """(root, {job: (seconds, {work: node ids})}, node names) of the three jobs, submitted
    one after another to the three-node cluster."""
    cluster, root = LocalRayCluster(), tmp_path_factory.mktemp("multinode")
    try:
        t0 = time.perf_counter()
        cluster.start_head(*THREE_NODES[0])
        cluster.add_nodes(THREE_NODES[1:])
        cluster.wait_for_nodes(len(THREE_NODES))
        print(f"\nboot: {time.perf_counter() - t0:.0f} s for 3 nodes")
        report = {}
        for job, command in (("synth", synth_command(root / "synth")),
                             ("train", train_command(four_step_export[1], root / "runs")),
                             ("index", index_command(shapes_index[0].gallery, root / "index"))):
            t0 = time.perf_counter()
            submission, log = cluster.submit(command, REPO)
            assert "succeeded" in log, log[-3000:]
            report[job] = (time.perf_counter() - t0, cluster.nodes_by_work(submission))
        return root, report, cluster.node_names()
    finally:
        cluster.stop()


def test_every_job_spreads_its_work_over_both_workers(three_node_run):
    _, report, names = three_node_run
    for job, (seconds, where) in report.items():
        used = {names.get(node, node) for nodes in where.values() for node in nodes}
        per_work = "; ".join(f"{work}: {'+'.join(sorted(names.get(n, n) for n in nodes))}"
                             for work, nodes in sorted(where.items()))
        print(f"\n{job}: {seconds:.0f} s on 3 nodes. Ran on: {per_work}")
        assert {"worker_a", "worker_b"} <= used, f"{job} ran only on {used}"
    train_workers = report["train"][1].get("RayTrainWorker", set())
    assert len(train_workers) == 2, f"the two training workers shared a node: {report['train'][1]}"


def _table(folder: Path, key: str):
    table = read_table(folder)
    return table.sort_by(key)


def test_synth_outputs_equal_a_single_node_run(three_node_run, shapes_synth):
    multi, single = three_node_run[0] / "synth", shapes_synth[0]
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


def test_training_equals_a_single_node_run_and_its_export_loads(three_node_run, four_step_export):
    from cir.models.export import load_composer
    from cir.train.run import run_folder

    export, cfg = four_step_export
    stage_dirs = [three_node_run[0] / "runs" / cfg.run.name / "finetune", run_folder(cfg) / "finetune"]
    histories = [json.loads((stage / "history.json").read_text()) for stage in stage_dirs]
    losses = [[h["loss"] for h in history if "loss" in h] for history in histories]
    assert losses[0] and np.allclose(losses[0], losses[1], rtol=1e-5), losses
    trained = [load_composer(stage_dirs[0] / "export").state_dict(), load_composer(export).state_dict()]
    assert trained[0].keys() == trained[1].keys()
    for name, weights in trained[0].items():
        np.testing.assert_allclose(weights.numpy(), trained[1][name].numpy(), atol=1e-5, err_msg=name)


def test_index_equals_a_single_node_run(three_node_run, shapes_index):
    manifests = [json.loads((Path(folder) / "index" / "manifest.json").read_text())
                 for folder in (three_node_run[0] / "index", shapes_index[0].output)]
    shards = [[(s["rows"], s["sha256"]) for s in m["shards"]] for m in manifests]
    assert len(shards[0]) == 2 and all(rows for rows, _ in shards[0])
    assert shards[0] == shards[1], "the shards' ids or FAISS files differ from the single-node run's"
