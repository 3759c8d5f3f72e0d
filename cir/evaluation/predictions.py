"""Predictions mode: ranked ids per query from JSON files, scored without a model."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

from cir.benchmarks.base import Benchmark
from cir.evaluation.config import EvalConfig
from cir.evaluation.data import load_benchmarks
from cir.evaluation.score import BenchResult, EvalResult, _headline
from cir.submission import read_json_object


def split_by_benchmark(preds: Mapping[str, list[str]], benches: Sequence[Benchmark], path: Path):
    """One predictions dict per benchmark (FashionIQ's ids "dress-12" name their
    category); an id of no benchmark, or a benchmark's missing query, is an error."""
    owner = {qid: i for i, b in enumerate(benches) for qid in b.query_ids}
    parts: list[dict] = [{} for _ in benches]
    unknown = [key for key in preds if key not in owner]
    if unknown:
        names = ", ".join(f"{b.name} {b.split}" for b in benches)
        raise ValueError(f"{path.name}: {len(unknown)} query ids of no query of {names} "
                         f"(e.g. {unknown[:5]})")
    for key, value in preds.items():
        parts[owner[key]][key] = value
    for bench, part in zip(benches, parts):
        bench.check_query_ids(part, f"{path.name}")
    return parts


def cirr_subset_from_ranking(bench: Benchmark, preds: Mapping[str, Sequence[str]]) -> tuple[dict, int]:
    """CIRR recall_subset lists from full-gallery rankings: each query's img_set members
    (reference removed) in ranking order; members the (truncated) ranking does not list
    follow in img_set order. Returns the lists and how many queries needed that fill."""
    out, filled = {}, 0
    for q in bench.queries:
        members = [m for m in dict.fromkeys(q.subset_ids) if m != q.ref_id]
        ranked = [i for i in preds[q.query_id] if i in members]
        ranked = list(dict.fromkeys(ranked))
        rest = [m for m in members if m not in ranked]
        filled += bool(rest)
        out[q.query_id] = ranked + rest
    return out, filled


def evaluate_prediction_files(cfg: EvalConfig, benches: Mapping[str, Benchmark] | None = None) -> EvalResult:
    """Predictions mode: score (or, on test splits, check and pass on) ranked ids."""
    from cir.metrics import evaluate_predictions
    from cir.submission import read_predictions

    t0 = time.perf_counter()
    benches = load_benchmarks(cfg) if benches is None else benches
    blist = list(benches.values())
    path = Path(cfg.predictions)
    raw = read_json_object(path)
    if raw.get("metric") == "recall_subset":
        raise ValueError(f"{path} is a CIRR recall_subset file: pass it as --subset-predictions, "
                         "and the recall file as --predictions")
    preds_parts = split_by_benchmark(read_predictions(path), blist, path)
    subset_parts: list = [None] * len(blist)
    if cfg.subset_predictions:
        spath = Path(cfg.subset_predictions)
        if any(b.protocol != "cirr" for b in blist):
            raise ValueError("--subset-predictions applies to CIRR only")
        if read_json_object(spath).get("metric") == "recall":
            raise ValueError(f"{spath} is a CIRR recall file, not a recall_subset one")
        subset_parts = split_by_benchmark(read_predictions(spath), blist, spath)
    results, info = [], {}
    for bench, preds, subset in zip(blist, preds_parts, subset_parts):
        metrics = evaluate_predictions(bench, preds, subset) if bench.has_targets else None
        if bench.protocol == "cirr":
            # Submission-ready lists: the protocol ranks without the reference.
            refs = {q.query_id: q.ref_id for q in bench.queries}
            preds = {k: [i for i in v if i != refs[k]] for k, v in preds.items()}
            if subset is None:
                subset, filled = cirr_subset_from_ranking(bench, preds)
                info["subset_from_ranking"] = {"queries_filled": filled}
            else:
                subset = {k: [i for i in v if i != refs[k]] for k, v in subset.items()}
        results.append(BenchResult(bench.name, bench.split, len(bench.queries), len(bench.gallery_ids),
                                   metrics, preds, subset))
    return EvalResult(cfg.benchmark, cfg.resolved_split, "predictions", None, None, results,
                      _headline(cfg.benchmark, results), {"total": time.perf_counter() - t0},
                      {"predictions": str(path), "subset_predictions": cfg.subset_predictions, **info})
