"""Searching shards and merging their answers into the one top-k.

Each shard returns its top-k plus every row tied with its k-th score (a tie may
straddle the cut), scored again in float64 from the stored vectors so that equal
vectors score equally in every shard. The merge then orders all candidates by score,
descending, and id, ascending: exactly what one index over all rows would return,
ties broken by id.
"""
from __future__ import annotations

import numpy as np


class ShardSearcher:
    """One shard: a FAISS index over unit vectors and the ids of its rows."""

    def __init__(self, index, ids: np.ndarray):
        self.index, self.ids = index, ids

    def search(self, queries: np.ndarray, k: int, with_vectors: bool = False) -> list[tuple]:
        """Per query: (scores, ids) of the top-k and of the rows tied with the k-th, and
        their stored vectors when `with_vectors` (for `collapse_near_duplicates`)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = self.index.ntotal
        out = []
        for q in queries:
            kk = min(k + 1, n)
            while True:
                _, rows = self.index.search(q[None], kk)
                rows = rows[0][rows[0] >= 0]
                scores = self._exact_scores(q, rows)
                order = np.lexsort((self.ids[rows], -scores))
                rows, scores = rows[order], scores[order]
                # A tie straddles the cut when the row after the k-th scores as the k-th.
                if len(rows) <= k or scores[k] < scores[k - 1] or kk >= n:
                    break
                kk = min(2 * kk, n)
            keep = scores >= scores[min(k, len(scores)) - 1] if len(scores) else np.zeros(0, bool)
            keep[: min(k, len(keep))] = True
            answer = (scores[keep], self.ids[rows[keep]])
            out.append(answer + (self._vectors(rows[keep]),) if with_vectors else answer)
        return out

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return np.zeros((0, self.index.d), np.float32)
        return self.index.reconstruct_batch(rows)

    def _exact_scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self._vectors(rows).astype(np.float64) @ query.astype(np.float64)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of one query's candidates from all shards: (scores, ids), ordered by
    score descending, then id ascending."""
    scores = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
    ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=object)
    order = np.lexsort((ids, -scores))[:k]
    return scores[order], ids[order]


def collapse_near_duplicates(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Positions of the results to keep, in rank order: a result is dropped when its
    cosine similarity to a better-ranked kept one reaches `threshold` (the `dedupe` of
    clip-retrieval's search API). Vectors are L2-normalised."""
    kept: list[int] = []
    for i in range(len(ids)):
        if not kept or float(np.max(vectors[kept] @ vectors[i])) < threshold:
            kept.append(i)
    return np.asarray(kept, dtype=np.int64)


class ShardedIndex:
    """All shards of an index folder in this process (a Serve app holds one shard per
    replica and merges with `merge_topk` the same way)."""

    def __init__(self, shards: list[ShardSearcher]):
        self.shards = shards

    @classmethod
    def load(cls, folder, mmap: bool = True) -> "ShardedIndex":
        from cir.index.build import load_shard, read_manifest

        manifest = read_manifest(folder)
        return cls([ShardSearcher(*load_shard(folder, i, manifest, mmap=mmap))
                    for i in range(len(manifest["shards"]))])

    def search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        per_shard = [s.search(queries, k) for s in self.shards]
        return [merge_topk([answers[q] for answers in per_shard], k) for q in range(len(queries))]
