"""Comparing eval runs on one benchmark split: per-query hits and a paired bootstrap.

Two runs scored on the same queries are compared query by query: most queries are easy
(or hard) for both, so resampling the queries with each query's pair of outcomes kept
together gives an interval for the difference that only the queries where the runs
disagree widen. That is the paired bootstrap: the 95% percentile interval of the mean
of (b - a) over resamples of the queries with replacement, in percentage points.

A query is a hit at k when any of its `Query.target_ids` is among the first k ids of its
ranking, after its reference is removed where the protocol ranks without it
(`cir.metrics.excludes_reference`, the eval's rule). So recall@k here is the eval's
recall@k for shapes and CIRR; FashionIQ's three categories are pooled (recall over all
queries, not the mean of the categories' recalls), and on CIRCO any of `gt_img_ids`
counts (CIRCO's own Recall@k counts only the annotated target). Test splits have no
targets and cannot be compared.

`compare_runs` takes output folders of `jobs/eval.py` (metrics.json + predictions.json)
and is what `jobs/compare.py` runs; no model, no Ray, no images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cir.benchmarks.base import Benchmark
from cir.config import from_dict
from cir.evaluation.config import EvalConfig
from cir.evaluation.data import load_benchmarks
from cir.evaluation.predictions import split_by_benchmark
from cir.metrics import excludes_reference, hits_at_k, prediction_rows, remove_ids, target_rows
from cir.submission import read_json_object, read_predictions

# The eval config keys that say which benchmark split a run scored; the rest (model,
# encoding settings) is not needed to load it, and leaving it out keeps the folders of
# older runs readable when those settings change.
BENCHMARK_KEYS = ("benchmark", "annotations", "data", "shapes")
# Bootstrap indices drawn at once (int64): bounds memory at 32 MB for any query count.
RESAMPLE_BLOCK = 2**22


def query_hits(bench: Benchmark, predictions: Mapping[str, Sequence], ks: Sequence[int]) -> dict[int, np.ndarray]:
    """bool [Q] for each k (queries in `bench` order): a target is in the top k of the
    query's ranked image ids, the reference removed where the protocol removes it."""
    if not bench.has_targets:
        raise ValueError(f"{bench.name} {bench.split} has no ground truth (a test split): "
                         "its runs cannot be compared")
    bench.check_query_ids(predictions, "predictions")
    ranked, index = prediction_rows(bench, predictions)
    if excludes_reference(bench):
        ranked = remove_ids(ranked, [index[q.ref_id] for q in bench.queries])
    return hits_at_k(ranked, target_rows(bench, index), ks)


def paired_bootstrap(hits_a, hits_b, n_resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a over the queries (hits as 0/1, so in percentage points) and its 95%
    percentile interval over `n_resamples` resamples of the queries with replacement."""
    a = np.asarray(hits_a, dtype=np.float64)
    b = np.asarray(hits_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"need per-query hits of the same queries, got shapes {a.shape} and {b.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    diff = (b - a) * 100
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, RESAMPLE_BLOCK // diff.size)
    for start in range(0, n_resamples, step):
        idx = rng.integers(0, diff.size, size=(min(step, n_resamples - start), diff.size))
        means[start:start + len(idx)] = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean_diff": float(diff.mean()), "lo": float(lo), "hi": float(hi)}


@dataclass
class EvalRun:
    """An output folder of jobs/eval.py: its metrics.json and its predictions.json."""

    folder: Path
    doc: dict
    predictions: Path


def read_eval_run(folder: str | Path) -> EvalRun:
    folder = Path(folder)
    metrics = folder / "metrics.json"
    doc = read_json_object(metrics, "metrics.json of an eval output folder (of jobs/eval.py)",
                           "(the metrics.json of jobs/eval.py)")
    if not isinstance(doc.get("config"), dict):
        raise ValueError(f"{metrics}: no run config in it (is it a metrics.json of jobs/eval.py?)")
    predictions = folder / "predictions.json"
    if not predictions.is_file():
        raise FileNotFoundError(
            f"{folder}: no predictions.json (jobs/eval.py writes one in model mode; a run in "
            f"predictions mode scored {doc['config'].get('predictions')!r}, not a ranking of its own)")
    return EvalRun(folder, doc, predictions)


def _benchmarks_of(run: EvalRun) -> list[Benchmark]:
    """The benchmark(s) `run` scored, loaded in predictions mode (no images needed)."""
    config = {k: run.doc["config"][k] for k in BENCHMARK_KEYS if k in run.doc["config"]}
    cfg = from_dict(EvalConfig, {**config, "split": run.doc["split"], "predictions": str(run.predictions)},
                    f"{run.folder / 'metrics.json'} config")
    return list(load_benchmarks(cfg).values())


def _pooled_hits(benches: Sequence[Benchmark], run: EvalRun, ks: Sequence[int]) -> dict[int, np.ndarray]:
    parts = split_by_benchmark(read_predictions(run.predictions), benches, run.predictions)
    per_bench = [query_hits(b, p, ks) for b, p in zip(benches, parts)]
    return {k: np.concatenate([h[k] for h in per_bench]) for k in ks}


def _scored(run: EvalRun) -> tuple:
    return run.doc.get("benchmark"), run.doc.get("split"), run.doc.get("counts")


def _describe(run: EvalRun) -> str:
    benchmark, split, counts = _scored(run)
    return f"{benchmark} {split} ({counts})"


def compare_runs(folders: Sequence[str | Path], ks: Sequence[int] = (1, 5, 10),
                 n_resamples: int = 10000, seed: int = 0) -> dict:
    """Recall@k of each run, and for every run after the first its paired-bootstrap
    difference to the first at each k. Returns a JSON-ready dict."""
    if len(folders) < 2:
        raise ValueError(f"need at least two eval folders to compare, got {len(folders)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    runs = [read_eval_run(f) for f in folders]
    first = runs[0]
    for run in runs[1:]:
        if _scored(run) != _scored(first):
            raise ValueError(f"{run.folder} scored {_describe(run)} but {first.folder} scored "
                             f"{_describe(first)}: only runs on one benchmark split can be compared")
    benches = _benchmarks_of(first)
    hits = [_pooled_hits(benches, run, ks) for run in runs]
    key = "recall@{}".format
    note = None
    if len(benches) > 1:
        note = f"the queries of {', '.join(b.name for b in benches)} pooled"
    elif benches[0].protocol == "circo":
        note = "a hit is any of gt_img_ids in the top k (CIRCO's Recall@k counts the annotated target only)"
    return {
        "benchmark": first.doc["benchmark"], "split": first.doc["split"], "queries": len(hits[0][ks[0]]),
        "ks": list(ks), "resamples": n_resamples, "seed": seed, "note": note,
        "runs": [{"folder": str(run.folder), "model": run.doc.get("model"),
                  "recall": {key(k): float(h[k].mean() * 100) for k in ks}} for run, h in zip(runs, hits)],
        "differences": [
            {"folder": str(run.folder), "against": str(first.folder),
             **{key(k): paired_bootstrap(hits[0][k], h[k], n_resamples, seed) for k in ks}}
            for run, h in zip(runs[1:], hits[1:])],
    }
