"""Comparing eval runs (cir.evaluation.compare, jobs/compare.py): the paired bootstrap on
hand-made hits, per-query hits on tiny benchmarks, and the job on two eval folders."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cir.benchmarks import Benchmark, Query, load_benchmark
from cir.data.shapes_corpus import write_benchmark
from cir.evaluation import EvalConfig, EvalResult, config_dict, score_embeddings, write_outputs
from cir.evaluation.compare import paired_bootstrap, query_hits
from cir.metrics import evaluate_predictions
from conftest import load_job


JOB = load_job("compare")


# ---- the bootstrap ---------------------------------------------------------------------------
def test_identical_runs_give_a_zero_interval():
    hits = np.random.default_rng(0).random(200) < 0.4
    assert paired_bootstrap(hits, hits, 2000) == {"mean_diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_a_run_better_on_every_query_gives_a_positive_interval():
    rng = np.random.default_rng(1)
    a = rng.random(300) < 0.4
    assert paired_bootstrap(np.zeros(300, bool), np.ones(300, bool), 2000) == \
        {"mean_diff": 100.0, "lo": 100.0, "hi": 100.0}
    # never worse, better on a tenth of the queries: the whole interval is above 0
    b = a | (rng.random(300) < 0.1)
    out = paired_bootstrap(a, b, 2000)
    assert out["mean_diff"] == pytest.approx((b.mean() - a.mean()) * 100)
    assert 0 < out["lo"] < out["mean_diff"] < out["hi"]
    # and the other way round, below 0
    assert paired_bootstrap(b, a, 2000)["hi"] < 0


def test_the_interval_narrows_with_more_queries():
    rng = np.random.default_rng(2)
    width = {}
    for n in (100, 2500):
        a, b = rng.random(n) < 0.5, rng.random(n) < 0.5  # unrelated runs of equal recall
        out = paired_bootstrap(a, b, 2000, seed=3)
        assert out["lo"] <= out["mean_diff"] <= out["hi"]
        width[n] = out["hi"] - out["lo"]
    # the standard error falls as 1/sqrt(n): 5x narrower for 25x the queries
    assert width[2500] < width[100] / 3, width
    assert paired_bootstrap(a, b, 500, seed=4) == paired_bootstrap(a, b, 500, seed=4)


def test_bootstrap_rejects_unpaired_hits():
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap([], [])


# ---- per-query hits --------------------------------------------------------------------------
def test_query_hits_follow_the_protocol():
    queries = [Query("q1", "r1", "t", ("a",)), Query("q2", "r2", "t", ("b",)), Query("q3", "r1", "t", ("c",))]
    preds = {"q1": ["r1", "a", "b"], "q2": ["a", "b"], "q3": ["a", "b", "r1"]}
    excluded = Benchmark("toy", "val", queries, ["r1", "r2", "a", "b", "c"], exclude_reference=True)
    hits = query_hits(excluded, preds, [1, 2])
    assert hits[1].tolist() == [True, False, False]  # q1's reference is removed from its list
    assert hits[2].tolist() == [True, True, False]
    assert evaluate_predictions(excluded, preds)["recall@1"] == hits[1].mean() * 100  # the eval's rule
    kept = Benchmark("toy", "val", queries, ["r1", "r2", "a", "b", "c"], exclude_reference=False)
    assert query_hits(kept, preds, [1, 2])[1].tolist() == [False, False, False]

    # CIRCO: any of the ground truths counts; without images there is no known gallery
    circo = Benchmark("circo", "val", [Query("0", "r", "t", ("g1", "g2", "g3")), Query("1", "r", "t", ("g4",))],
                      [], protocol="circo")
    hits = query_hits(circo, {"0": ["x", "g3"], "1": ["g1", "y", "g4"]}, [1, 2, 3])
    assert [hits[k].tolist() for k in (1, 2, 3)] == [[False, False], [True, False], [True, True]]

    with pytest.raises(ValueError, match="1 of 3 queries missing"):
        query_hits(excluded, {"q1": ["a"], "q2": ["b"]}, [1])
    test = Benchmark("toy", "test", [Query("q1", "r1", "t")], ["r1", "a"])
    with pytest.raises(ValueError, match="no ground truth"):
        query_hits(test, {"q1": ["a"]}, [1])


# ---- the job ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    """Two model-mode eval folders on a tiny shapes test split, written by the eval's own
    scoring and writer: run 1 queries with noisy targets, run 2 with less noise."""
    tmp = tmp_path_factory.mktemp("compare")
    root = write_benchmark(tmp / "bench", seed=3, n_train=10, n_val=20, n_test=20)
    cfg = EvalConfig(benchmark="shapes", split="test", data=str(root))
    bench = load_benchmark("shapes", "test", root)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(len(bench.gallery_ids), 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    targets = g[bench.target_indices()[:, 0]]
    dirs = []
    for name, noise in (("noisy", 1.2), ("clean", 0.3)):
        q = targets + rng.normal(scale=noise, size=targets.shape).astype(np.float32)
        result = score_embeddings(bench, q, g)
        run = EvalResult("shapes", "test", "model", f"fake:{name}", None, [result], result.metrics)
        write_outputs(run, {"shapes": bench}, tmp / name, config_dict(cfg))
        dirs.append(tmp / name)
    return dirs


def test_job_compares_two_eval_folders(eval_dirs, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert JOB.main([*map(str, eval_dirs), "--k", "1", "5", "--resamples", "2000", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shapes test: 20 queries" in printed and "run 2" in printed and "difference to run 1" in printed
    result = json.loads(out.read_text())
    assert (result["benchmark"], result["split"], result["queries"], result["ks"]) == ("shapes", "test", 20, [1, 5])
    for run, folder in zip(result["runs"], eval_dirs):
        eval_metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert run["recall"] == {k: pytest.approx(eval_metrics[k]) for k in ("recall@1", "recall@5")}
    recall = [r["recall"] for r in result["runs"]]
    assert recall[1]["recall@1"] > recall[0]["recall@1"]  # the less noisy run is better
    (diff,) = result["differences"]
    for k in ("recall@1", "recall@5"):
        d = diff[k]
        assert d["mean_diff"] == pytest.approx(recall[1][k] - recall[0][k])
        assert d["lo"] <= d["mean_diff"] <= d["hi"]


def test_job_refuses_what_it_cannot_compare(eval_dirs, tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.json").write_text((eval_dirs[0] / "metrics.json").read_text())
    assert JOB.main([str(eval_dirs[0]), str(lone)]) == 2
    assert "no predictions.json" in capsys.readouterr().err

    other = tmp_path / "val"
    other.mkdir()
    doc = json.loads((eval_dirs[0] / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**doc, "split": "val"}))
    (other / "predictions.json").write_text((eval_dirs[0] / "predictions.json").read_text())
    assert JOB.main([str(eval_dirs[0]), str(other)]) == 2
    assert "only runs on one benchmark split" in capsys.readouterr().err

    assert JOB.main([str(eval_dirs[0])]) == 2
    assert "at least two" in capsys.readouterr().err
