"""Retrieval metrics of the CIR benchmarks, following each official protocol exactly.

Rankings are int arrays [Q, K] of gallery rows, best first, padded with -1 where a
list is shorter; targets are [Q, T] arrays padded with -1. All core computations are
vectorised over queries (loops run only over K, T or query chunks) so that 10k
queries against a 100k gallery rank and score in seconds. Values are in percent.

Protocols (see the reader modules for where each detail comes from):
* CIRR: Recall@{1,5,10,50} over the split gallery with the reference removed from
  the ranking; Recall_subset@{1,2,3} over `img_set.members` minus the reference;
  avg = (Recall@5 + Recall_subset@1) / 2. As in CIRR's / CLIP4Cir's `validate.py`.
* FashionIQ: Recall@{10,50} per category over the full category gallery, reference
  NOT removed (CLIP4Cir, SEARLE and the official starter kit do not remove it); the
  reported numbers are the means over the three categories.
* CIRCO: transcribed from miccunifi/CIRCO src/evaluation.py: labels = isin(ranking,
  gt_img_ids); precision_k = cumsum(labels)_k * labels_k / k; AP@K = sum of
  precision_k over k <= K divided by min(K, |gt_img_ids|); Recall@K on target_img_id
  only; semantic mAP@10 = mAP@10 over the queries having each aspect. The server
  scores the submitted list as is (a repeated id counts twice in AP and Recall, the
  reference is not removed), and so does this code.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cir.benchmarks.base import Benchmark

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
CIRCO_KS = (5, 10, 25, 50)
RECALL_KS = (1, 5, 10, 50)


# ---- ranking ----------------------------------------------------------------------
def _as_2d(a: np.ndarray | Sequence | None, rows: int) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a, dtype=np.int64)
    a = a.reshape(-1, 1) if a.ndim == 1 else a
    if a.shape[0] != rows:
        raise ValueError(f"expected {rows} rows of ids, got {a.shape[0]}")
    return a


def _sorted_topk(scores: np.ndarray, cols: np.ndarray | None, k: int) -> np.ndarray:
    """Top-k of each row of `scores` (whose columns are `cols`, or 0..n-1), best first."""
    n = scores.shape[1]
    if cols is None:
        cols = np.broadcast_to(np.arange(n), scores.shape)
    if k < n:
        part = np.argpartition(scores, n - k, axis=1)[:, n - k :]
        scores = np.take_along_axis(scores, part, axis=1)
        cols = np.take_along_axis(cols, part, axis=1)
    order = np.lexsort((cols, -scores), axis=1)  # score descending, then lower column
    return np.take_along_axis(cols, order, axis=1)


def _topk_rows(scores: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
    """Top-k columns of each row of `scores` (modified in place), best first.

    Exact, and cheaper than an argpartition of whole rows (~7 ns per score): columns
    are cut into blocks of b and each block's maximum taken. The k blocks with the
    largest maxima hold every top-k score (a score above the k-th largest block
    maximum needs its own block among those k), so only k * b candidates per row are
    partitioned and sorted. Equal scores come out in the lower column first, except
    that which of several exactly tied scores make the cut at rank k is unspecified
    (as with torch.topk / argsort in the official code).
    """
    c, g = scores.shape
    rows = np.arange(c)
    if exclude is not None:
        for col in exclude.T:  # loop over the (few) excluded ids per query
            ok = col >= 0
            scores[rows[ok], col[ok]] = -np.inf
    b = int(np.clip(round(np.sqrt(g / max(k, 1))), 8, 256))
    nb = g // b
    if nb < 4 * k:  # small gallery or large k: blocks do not pay off
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN (check the embeddings)")
        top = _sorted_topk(scores, None, min(k, g))
    else:
        # Block j = columns j, j + nb, j + 2nb, ...: the max over axis 1 is a vectorised
        # elementwise maximum of b contiguous rows (a reshape(c, nb, b).max(2) is 10x slower).
        block_max = scores[:, : nb * b].reshape(c, b, nb).max(axis=1)
        if g > nb * b:  # the leftover columns form one more, shorter block
            tail = scores[:, nb * b :].max(axis=1, keepdims=True)
            block_max = np.concatenate([block_max, tail], axis=1)
        if np.isnan(block_max).any():  # max propagates NaN
            raise ValueError("scores contain NaN (check the embeddings)")
        blocks = np.argpartition(block_max, block_max.shape[1] - k, axis=1)[:, -k:]
        cols = blocks[:, :, None] + np.arange(b) * nb  # [c, k, b]
        cols[blocks == nb] = nb * b + np.arange(b)  # the tail block: columns nb*b + i
        cols = cols.reshape(c, -1)
        valid = cols < g
        cols = np.where(valid, cols, 0)
        cand = np.take_along_axis(scores, cols, axis=1)
        cand[~valid] = -np.inf
        top = _sorted_topk(cand, cols, k)
    top = top.astype(np.int32)
    if exclude is not None:  # excluded ids only come back when k exceeds what is left
        top[hits(top, exclude)] = -1
    return top


def _check_k(k: int, g: int) -> int:
    if int(k) < 1 or g < 1:
        raise ValueError(f"need k >= 1 and a non-empty gallery, got k={k}, gallery of {g}")
    return min(int(k), g)


def _chunk_rows(n_cols: int, chunk: int | None, memory_mb: float) -> int:
    return chunk if chunk else max(1, int(memory_mb * 2**20 // (4 * max(n_cols, 1))))


def topk_from_scores(
    scores: np.ndarray, k: int, exclude=None, chunk: int | None = None, memory_mb: float = 128
) -> np.ndarray:
    """[Q, k] int32 top-k columns of a score matrix [Q, G], best first.

    `exclude`: [Q] or [Q, E] gallery rows to leave out per query (-1 = none); they
    never appear in the output, which is padded with -1 when k exceeds what is left.
    Works on row chunks (about `memory_mb` each) so `scores` may be a memmap.
    """
    q, g = scores.shape
    k = _check_k(k, g)
    exclude = _as_2d(exclude, q)
    step = _chunk_rows(g, chunk, memory_mb)
    out = np.empty((q, k), dtype=np.int32)
    for s in range(0, q, step):
        block = np.array(scores[s : s + step], dtype=np.float32)  # a copy: we write -inf
        out[s : s + step] = _topk_rows(block, k, None if exclude is None else exclude[s : s + step])
    return out


def rank_by_similarity(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    k: int,
    exclude=None,
    chunk: int | None = None,
    memory_mb: float = 128,
) -> np.ndarray:
    """[Q, k] int32 gallery rows by descending dot product, computed in query chunks.

    The full [Q, G] score matrix is never held (10k x 100k is 4 GB in float32): each
    chunk of queries is scored, `exclude`d rows set to -inf, and reduced to its top k
    with an exact block-max top-k (see `_topk_rows`).
    """
    qe = np.asarray(query_emb, dtype=np.float32)
    ge = np.asarray(gallery_emb, dtype=np.float32)
    if qe.ndim != 2 or ge.ndim != 2 or qe.shape[1] != ge.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {qe.shape}, gallery {ge.shape}")
    q, g = qe.shape[0], ge.shape[0]
    k = _check_k(k, g)
    exclude = _as_2d(exclude, q)
    step = _chunk_rows(g, chunk, memory_mb)
    gt = np.ascontiguousarray(ge.T)
    out = np.empty((q, k), dtype=np.int32)
    for s in range(0, q, step):
        block = qe[s : s + step] @ gt
        out[s : s + step] = _topk_rows(block, k, None if exclude is None else exclude[s : s + step])
    return out


def rank_candidates(query_emb, gallery_emb, candidates, exclude=None, chunk: int = 4096) -> np.ndarray:
    """Order each query's own candidates [Q, M] (gallery rows, -1 pad) by descending score.

    Used for CIRR's Recall_subset: only the six `img_set.members` are ranked. Excluded
    rows and padding go to the end as -1. Ties keep the candidates' order.
    """
    qe = np.asarray(query_emb, dtype=np.float32)
    ge = np.asarray(gallery_emb, dtype=np.float32)
    cand = np.asarray(candidates, dtype=np.int64)
    exclude = _as_2d(exclude, cand.shape[0])
    out = np.empty(cand.shape, dtype=np.int64)
    for s in range(0, cand.shape[0], chunk):
        c = cand[s : s + chunk]
        valid = c >= 0
        if exclude is not None:
            valid &= ~hits(c, exclude[s : s + chunk])
        scores = np.einsum("qd,qmd->qm", qe[s : s + chunk], ge[np.where(c >= 0, c, 0)])
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        o = np.take_along_axis(c, order, axis=1)
        o[~np.take_along_axis(valid, order, axis=1)] = -1
        out[s : s + chunk] = o
    return out


# ---- list operations ----------------------------------------------------------------
def hits(ranked: np.ndarray, targets) -> np.ndarray:
    """bool [Q, K]: ranked[q, k] is one of targets[q] (targets [Q] or [Q, T], -1 = pad)."""
    ranked = np.asarray(ranked)
    targets = _as_2d(targets, ranked.shape[0])
    out = np.zeros(ranked.shape, dtype=bool)
    for col in targets.T:
        out |= (ranked == col[:, None]) & (col[:, None] >= 0)
    return out


def _compact(ranked: np.ndarray, drop: np.ndarray, width: int | None = None) -> np.ndarray:
    """Remove the `drop` entries of each row, shift the rest left, pad with -1."""
    drop = drop | (ranked < 0)
    order = np.argsort(drop, axis=1, kind="stable")
    out = np.take_along_axis(ranked, order, axis=1).astype(np.int64)
    out[np.take_along_axis(drop, order, axis=1)] = -1
    return out if width is None else out[:, :width]


def remove_ids(ranked, exclude) -> np.ndarray:
    """The rankings with the `exclude` ids ([Q] or [Q, E]) removed (e.g. the reference)."""
    ranked = np.asarray(ranked)
    return _compact(ranked, hits(ranked, exclude))


def restrict_to(ranked, allowed) -> np.ndarray:
    """Keep only each query's `allowed` ids [Q, M], in ranking order (width <= M).

    Derives CIRR's subset ranking from a full ranking. With a truncated ranking, a
    member missing from the list counts as ranked below every listed one.
    """
    ranked = np.asarray(ranked)
    allowed = _as_2d(allowed, ranked.shape[0])
    return _compact(ranked, ~hits(ranked, allowed), width=min(ranked.shape[1], allowed.shape[1]))


# ---- generic metrics ------------------------------------------------------------------
def hits_at_k(ranked, targets, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """bool [Q] for each k: the query has any of its targets in its top k."""
    h = hits(ranked, targets)
    if h.shape[0] == 0:
        raise ValueError("no queries to score")
    return {k: h[:, :k].any(axis=1) for k in ks}


def recall_at_k(ranked, targets, ks: Sequence[int]) -> dict[int, float]:
    """Percent of queries with any of their targets in the top k, for each k."""
    return {k: float(h.mean() * 100) for k, h in hits_at_k(ranked, targets, ks).items()}


def embedding_recall(query_emb, gallery_emb, targets, ks: Sequence[int], exclude=None) -> dict[int, float]:
    """Recall@k (percent) of ranking `gallery_emb` by dot product for each query;
    `targets` and `exclude` are gallery rows ([Q] or [Q, T], -1 = pad), as in
    `rank_by_similarity` and `recall_at_k`."""
    ranked = rank_by_similarity(query_emb, gallery_emb, max(ks), exclude=exclude)
    return recall_at_k(ranked, targets, ks)


def average_precision_at_k(ranked, gts, ks: Sequence[int]) -> np.ndarray:
    """[Q, len(ks)] AP@k of CIRCO's evaluation.py (fractions, not percent)."""
    labels = hits(ranked, gts).astype(np.float64)
    n_gt = (_as_2d(gts, labels.shape[0]) >= 0).sum(axis=1)
    if np.any(n_gt == 0):
        raise ValueError("a query has no ground-truth ids")
    precisions = np.cumsum(labels, axis=1) * labels / np.arange(1, labels.shape[1] + 1)
    return np.stack(
        [precisions[:, :k].sum(axis=1) / np.minimum(n_gt, k) for k in ks], axis=1
    )


# ---- benchmark protocols ----------------------------------------------------------------
def cirr_metrics(ranked, targets, references, subset_ranked=None, subsets=None) -> dict[str, float]:
    """CIRR Recall@K, Recall_subset@K and avg. The reference is removed from both lists.

    ranked: [Q, K] gallery rows; targets, references: [Q]; subset_ranked: [Q, M] the
    ranking within the subset, or None to derive it from `ranked` and `subsets` [Q, 6].
    """
    ranked = remove_ids(ranked, references)
    if subset_ranked is None:
        if subsets is None:
            raise ValueError("cirr_metrics needs subset_ranked or subsets")
        subset_ranked = restrict_to(ranked, subsets)
    subset_ranked = remove_ids(subset_ranked, references)
    out = {f"recall@{k}": v for k, v in recall_at_k(ranked, targets, CIRR_KS).items()}
    sub = recall_at_k(subset_ranked, targets, CIRR_SUBSET_KS)
    out.update({f"recall_subset@{k}": v for k, v in sub.items()})
    out["avg"] = (out["recall@5"] + out["recall_subset@1"]) / 2
    return out


def fashioniq_metrics(ranked, targets) -> dict[str, float]:
    """Recall@10 and Recall@50 of one FashionIQ category (reference kept in the ranking)."""
    return {f"recall@{k}": v for k, v in recall_at_k(ranked, targets, FASHIONIQ_KS).items()}


def fashioniq_average(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-category numbers (keys "dress/recall@10", ...) and their means, as reported."""
    out: dict[str, float] = {}
    for cat, m in per_category.items():
        out.update({f"{cat}/{key}": v for key, v in m.items()})
    for k in FASHIONIQ_KS:
        out[f"recall@{k}"] = float(np.mean([m[f"recall@{k}"] for m in per_category.values()]))
    out["avg"] = (out["recall@10"] + out["recall@50"]) / 2
    return out


def circo_metrics(ranked, gts, targets=None, aspects: Sequence[Sequence[str]] | None = None):
    """CIRCO mAP@{5,10,25,50} over all gts, Recall@K on the target (default gts[:, 0]),
    and semantic mAP@10 per aspect (keys "semantic_map@10/<aspect>") when given."""
    gts = _as_2d(gts, len(ranked))
    targets = gts[:, 0] if targets is None else targets
    ap = average_precision_at_k(ranked, gts, CIRCO_KS)
    out = {f"map@{k}": float(ap[:, i].mean() * 100) for i, k in enumerate(CIRCO_KS)}
    # evaluation.py sums the target's hits, so a list naming the target twice counts it
    # twice; kept for exactness (submission files are checked for duplicates anyway).
    target_hits = hits(ranked, targets)
    out.update({f"recall@{k}": float(target_hits[:, :k].sum(axis=1).mean() * 100) for k in CIRCO_KS})
    if aspects is not None:
        ap10 = ap[:, CIRCO_KS.index(10)]
        for aspect in sorted({a for qa in aspects for a in qa}):
            has = np.array([aspect in qa for qa in aspects])
            out[f"semantic_map@10/{aspect}"] = float(ap10[has].mean() * 100)
    return out


def _row(bench: Benchmark, index: Mapping[str, int], image_id: str, q, what: str) -> int:
    if image_id not in index:
        raise KeyError(f"{bench.name} {bench.split}: {what} {image_id!r} of query "
                       f"{q.query_id!r} is not in the gallery")
    return index[image_id]


def target_rows(bench: Benchmark, index: Mapping[str, int]) -> np.ndarray:
    """[Q, T] rows (in `index`: image id -> row) of each query's `target_ids`, -1 pad."""
    width = max(len(q.target_ids) for q in bench.queries)
    out = np.full((len(bench.queries), width), -1, dtype=np.int64)
    for i, q in enumerate(bench.queries):
        out[i, : len(q.target_ids)] = [_row(bench, index, t, q, "target") for t in q.target_ids]
    return out


def _protocol_metrics(bench: Benchmark, ranked: np.ndarray, index: Mapping[str, int], subset_ranked=None):
    if not bench.has_targets:
        raise ValueError(f"{bench.name} {bench.split} has no ground truth (a test split): "
                         "write a submission file instead")
    if len(ranked) != len(bench.queries):
        raise ValueError(f"{len(ranked)} rankings for {len(bench.queries)} queries")
    qs = bench.queries
    tgt = target_rows(bench, index)
    refs = np.array([index.get(q.ref_id, -1) for q in qs], dtype=np.int64)
    if bench.protocol == "cirr":
        subsets = None
        if subset_ranked is None:
            subsets = np.array([[_row(bench, index, m, q, "subset member") for m in q.subset_ids]
                                for q in qs])
        return cirr_metrics(ranked, tgt[:, 0], refs, subset_ranked, subsets)
    if bench.protocol == "fashioniq":
        return fashioniq_metrics(ranked, tgt)
    if bench.protocol == "circo":
        aspects = [q.meta.get("semantic_aspects", ()) for q in qs]
        return circo_metrics(ranked, tgt, aspects=aspects)
    if bench.exclude_reference:
        ranked = remove_ids(ranked, refs)
    return {f"recall@{k}": v for k, v in recall_at_k(ranked, tgt, RECALL_KS).items()}


def evaluate_ranked(bench: Benchmark, ranked, subset_ranked=None) -> dict[str, float]:
    """Metrics of `bench`'s protocol for rankings [Q, K] of rows of `bench.gallery_ids`."""
    return _protocol_metrics(bench, np.asarray(ranked), bench.gallery_index, subset_ranked)


def evaluate_predictions(
    bench: Benchmark,
    predictions: Mapping[str, Sequence],
    subset_predictions: Mapping[str, Sequence] | None = None,
) -> dict[str, float]:
    """Metrics for ranked image ids per query id (a predictions/submission file).

    Every query must be present and no other. Ids outside a known gallery are an error;
    CIRCO without images has no known gallery, and any COCO id is accepted.
    """
    bench.check_query_ids(predictions, "predictions")
    ranked, index = prediction_rows(bench, predictions)
    subset = None
    if subset_predictions is not None:
        bench.check_query_ids(subset_predictions, "subset predictions")
        subset, index = prediction_rows(bench, subset_predictions, index)
    return _protocol_metrics(bench, ranked, index, subset)


def prediction_rows(
    bench: Benchmark, predictions: Mapping[str, Sequence], index: dict[str, int] | None = None
) -> tuple[np.ndarray, dict[str, int]]:
    """Rankings [Q, K] (queries in `bench` order, -1 pad) of ranked image ids per query
    id, and the image id -> row map they use (returned grown; pass it back to number a
    second file alike). Rows are the gallery's, then references, targets and subset
    members outside it; an id outside a known gallery is a KeyError, but CIRCO without
    images has no known gallery and its ids are numbered as they come."""
    if index is None:
        index = dict(bench.gallery_index)
        for q in bench.queries:
            for i in (q.ref_id, *q.target_ids, *(q.subset_ids or ())):
                index.setdefault(i, len(index))
    strict = bool(bench.gallery_ids)
    predictions = {str(key): v for key, v in predictions.items()}
    lists = [[str(x) for x in predictions[q.query_id]] for q in bench.queries]
    out = np.full((len(lists), max((len(x) for x in lists), default=1) or 1), -1, dtype=np.int64)
    for r, (q, ids) in enumerate(zip(bench.queries, lists)):
        for c, i in enumerate(ids):
            if i not in index:
                if strict:
                    raise KeyError(f"{bench.name} {bench.split}: query {q.query_id!r} lists image "
                                   f"{i!r}, which is not in the gallery")
                index[i] = len(index)
            out[r, c] = index[i]
    return out, index


def excludes_reference(bench: Benchmark) -> bool:
    """Whether `bench`'s protocol ranks without the query's reference image (CIRR's
    always does; its readers set `exclude_reference` too)."""
    return bench.exclude_reference or bench.protocol == "cirr"


def rank_benchmark(
    bench: Benchmark, query_emb, gallery_emb, k: int = 50, exclude_reference: bool | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rank `gallery_emb` (rows aligned with `bench.gallery_ids`) for each query embedding.

    Returns (ranked [Q, k], subset_ranked [Q, M] or None): the gallery rows by descending
    dot product and, for CIRR, each query's `img_set.members` in that order (for
    Recall_subset). The reference is left out of both when the protocol says so
    (`excludes_reference`) unless `exclude_reference` overrides it."""
    ge = np.asarray(gallery_emb, dtype=np.float32)
    if ge.shape[0] != len(bench.gallery_ids):
        raise ValueError(f"{ge.shape[0]} gallery embeddings for {len(bench.gallery_ids)} gallery ids")
    exclude = excludes_reference(bench) if exclude_reference is None else exclude_reference
    refs = bench.reference_indices() if exclude else None
    ranked = rank_by_similarity(query_emb, ge, k, exclude=refs)
    subset_ranked = None
    if bench.protocol == "cirr":
        subset_ranked = rank_candidates(query_emb, ge, bench.subset_indices(), exclude=refs)
    return ranked, subset_ranked


def evaluate_embeddings(
    bench: Benchmark, query_emb, gallery_emb, k: int = 50, exclude_reference: bool | None = None
) -> dict[str, float]:
    """`rank_benchmark`, then score with the benchmark's protocol (CIRR's metrics remove
    the reference even when `exclude_reference=False` kept it in the ranking, as its
    protocol requires)."""
    return evaluate_ranked(bench, *rank_benchmark(bench, query_emb, gallery_emb, k, exclude_reference))
