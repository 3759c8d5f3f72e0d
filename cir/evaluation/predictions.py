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


def largest_k(bench: Benchmark) -> int:
    """How many ids a list needs for every K its protocol reports, capped by how many
    candidates there are (the gallery, less the reference where the protocol removes it;
    CIRCO without images has no known gallery)."""
    from cir.metrics import CIRCO_KS, CIRR_KS, FASHIONIQ_KS, RECALL_KS, excludes_reference

    ks = {"cirr": CIRR_KS, "fashioniq": FASHIONIQ_KS, "circo": CIRCO_KS}.get(bench.protocol, RECALL_KS)
    candidates = len(bench.gallery_ids) - excludes_reference(bench)
    return min(max(ks), candidates) if bench.gallery_ids else max(ks)


def check_lists(bench: Benchmark, preds: Mapping[str, Sequence[str]], what: str) -> list[str]:
    """Refuse a list that names an image twice (the official evaluation code stops on it),
    naming the query; warn, saying what the number means, when lists are shorter than
    the protocol's largest K."""
    from cir.metrics import excludes_reference
    from cir.submission import refuse_repeats

    need, short = largest_k(bench), []
    for q in bench.queries:
        ids = preds[q.query_id]
        refuse_repeats(q.query_id, ids, what)
        listed = len(ids) - (excludes_reference(bench) and q.ref_id in ids)
        if listed < need:
            short.append((q.query_id, listed))
    if not short or not bench.has_targets:     # a test split's submission writer refuses them outright
        return []
    return [f"{what}: {len(short)} of {len(bench.queries)} {bench.name} queries list fewer than {need} images "
            f"(e.g. query {short[0][0]}: {short[0][1]}); a target past the end of a list counts as missed, so "
            "Recall@K for K over a list's length is a lower bound, not the official figure"]


def check_subset_lists(bench: Benchmark, subset: Mapping[str, Sequence[str]], what: str) -> list[str]:
    """CIRR recall_subset lists: refuse an image listed twice or one outside the query's
    img_set, naming the query; warn when lists are shorter than Recall_subset's largest K."""
    from cir.metrics import CIRR_SUBSET_KS
    from cir.submission import refuse_repeats

    short = []
    for q in bench.queries:
        ids, members = subset[q.query_id], set(q.subset_ids)
        refuse_repeats(q.query_id, ids, what)
        bad = [i for i in ids if i not in members]
        if bad:
            raise ValueError(f"{what}: query {q.query_id} lists {bad[0]!r}, not a member of its img_set "
                             f"({', '.join(sorted(members))})")
        if len(ids) - (q.ref_id in ids) < min(max(CIRR_SUBSET_KS), len(members) - 1):
            short.append(q.query_id)
    if not short or not bench.has_targets:
        return []
    return [f"{what}: {len(short)} queries list fewer than {max(CIRR_SUBSET_KS)} members (e.g. query "
            f"{short[0]}); Recall_subset@K past a list's end is a lower bound, not the official figure"]


def subset_fill_warning(bench: Benchmark, filled: int, what: str) -> list[str]:
    """What Recall_subset (or the recall_subset submission) means when it comes from
    truncated rankings that miss img_set members."""
    if not filled:
        return []
    head = (f"{what}: no --subset-predictions, so Recall_subset comes from these lists; for {filled} of "
            f"{len(bench.queries)} queries a list does not hold every member of its img_set")
    if not bench.has_targets:
        return [f"{head}, and the recall_subset submission lists the missing members after the listed ones, "
                "in img_set order"]
    return [f"{head}, and a member not listed counts as ranked below every listed one (the official figure "
            "ranks all members): not comparable with the official Recall_subset; give the subset file"]


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
    results, info = [], {"warnings": []}
    for bench, preds, subset in zip(blist, preds_parts, subset_parts):
        info["warnings"] += check_lists(bench, preds, path.name)
        if subset is not None:
            info["warnings"] += check_subset_lists(bench, subset, Path(cfg.subset_predictions).name)
        metrics = evaluate_predictions(bench, preds, subset) if bench.has_targets else None
        if bench.protocol == "cirr":
            # Submission-ready lists: the protocol ranks without the reference.
            refs = {q.query_id: q.ref_id for q in bench.queries}
            preds = {k: [i for i in v if i != refs[k]] for k, v in preds.items()}
            if subset is None:
                subset, filled = cirr_subset_from_ranking(bench, preds)
                info["subset_from_ranking"] = {"queries_filled": filled}
                info["warnings"] += subset_fill_warning(bench, filled, path.name)
            else:
                subset = {k: [i for i in v if i != refs[k]] for k, v in subset.items()}
        results.append(BenchResult(bench.name, bench.split, len(bench.queries), len(bench.gallery_ids),
                                   metrics, preds, subset))
    return EvalResult(cfg.benchmark, cfg.resolved_split, "predictions", None, None, results,
                      _headline(cfg.benchmark, results), {"total": time.perf_counter() - t0},
                      {"predictions": str(path), "subset_predictions": cfg.subset_predictions, **info})
