"""Ranking and scoring embeddings; model mode end to end (`evaluate_model`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from cir.benchmarks.base import Benchmark
from cir.evaluation.config import DEFAULT_ENCODER, EvalConfig
from cir.evaluation.data import load_benchmarks
from cir.evaluation.encode import encode_benchmarks


@dataclass
class BenchResult:
    """What one benchmark split gave: metrics (None without ground truth) and rankings."""

    name: str
    split: str
    queries: int
    gallery: int
    metrics: dict[str, float] | None
    predictions: dict[str, list[str]]  # query id -> ranked image ids (reference removed
    # where the protocol removes it, in model mode)
    subset_predictions: dict[str, list[str]] | None = None  # CIRR recall_subset


@dataclass
class EvalResult:
    benchmark: str
    split: str
    mode: str  # "model" | "predictions"
    model: str | None
    encoder: str | None
    results: list[BenchResult]
    metrics: dict[str, float] | None  # the headline numbers (FashionIQ: with the averages)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def score_embeddings(bench: Benchmark, query_emb, gallery_emb, k: int = 50) -> BenchResult:
    """Rank the gallery for each query (`cir.metrics.rank_benchmark`: reference excluded
    when the protocol says so) and score it, or only rank it on a split without ground truth."""
    from cir.metrics import evaluate_ranked, rank_benchmark
    from cir.submission import predictions_from_ranked

    ranked, subset_ranked = rank_benchmark(bench, query_emb, gallery_emb, k)
    metrics = evaluate_ranked(bench, ranked, subset_ranked) if bench.has_targets else None
    subset_preds = None if subset_ranked is None else predictions_from_ranked(bench, subset_ranked)
    return BenchResult(bench.name, bench.split, len(bench.queries), len(bench.gallery_ids), metrics,
                       predictions_from_ranked(bench, ranked), subset_preds)


def _headline(benchmark: str, results: Sequence[BenchResult]) -> dict[str, float] | None:
    if any(r.metrics is None for r in results):
        return None
    if len(results) == 1:
        return dict(results[0].metrics)
    from cir.metrics import fashioniq_average

    return fashioniq_average({r.name.removeprefix("fashioniq-"): r.metrics for r in results})


def evaluate_model(cfg: EvalConfig, benches: Mapping[str, Benchmark] | None = None) -> EvalResult:
    """Model mode: encode with Ray Data (Ray must be running), rank, score."""
    t0 = time.perf_counter()
    benches = load_benchmarks(cfg) if benches is None else benches
    t_load = time.perf_counter() - t0
    blist = list(benches.values())
    # a checkpoint carries its own vision tower: only an encoder the user chose is checked against it
    chosen = cfg.model.startswith("baseline:") or cfg.encoder != DEFAULT_ENCODER
    per_bench, info = encode_benchmarks(blist, cfg.model, cfg.encoder if chosen else None, cfg.encode)
    t1 = time.perf_counter()
    results = [score_embeddings(b, q, g, cfg.k) for b, (q, g) in zip(blist, per_bench)]
    t_rank = time.perf_counter() - t1
    encoder = cfg.encoder if cfg.model.startswith("baseline:") else None
    return EvalResult(cfg.benchmark, cfg.resolved_split, "model", cfg.model, encoder, results,
                      _headline(cfg.benchmark, results),
                      {**({"load": t_load} if t_load > 0.05 else {}), "encode": info["seconds"],
                       "rank": t_rank, "total": time.perf_counter() - t0}, {"encode": info})
