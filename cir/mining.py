"""Pair mining: FAISS k-nearest neighbours over L2-normalised embeddings.

Pairs worth describing are similar but not identical: a similarity band [lo, hi]
drops unrelated images (below lo) and near-duplicates (above hi). Exact search
(`IndexFlatIP`) is used up to `exact_limit` vectors; above it an IVF index is built,
which is orders of magnitude cheaper for self-kNN at 100k+ and keeps recall@k high
when `nprobe` is a few percent of the lists (see `jobs/bench.py` for its recall).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from cir.progress import log


@dataclass(frozen=True)
class MiningConfig:
    k: int = 10
    lo: float = 0.5
    hi: float = 0.99
    max_pairs_per_image: int = 3
    same_category: bool = False
    keep_both_directions: bool = False
    exact_limit: int = 50_000
    nprobe: int = 16
    threads: int = 0  # 0: FAISS default (all cores)

    def validate(self) -> None:
        if not -1.0 <= self.lo <= 1.0 or not -1.0 <= self.hi <= 1.0:
            raise ValueError(f"similarity band must lie in [-1, 1], got [{self.lo}, {self.hi}]")
        if self.lo > self.hi:
            raise ValueError(f"similarity band has lo > hi: [{self.lo}, {self.hi}]")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_pairs_per_image < 1:
            raise ValueError(f"max_pairs_per_image must be >= 1, got {self.max_pairs_per_image}")


def faiss_gpu_count() -> int:
    """GPUs FAISS can use (asks FAISS itself, not the package name)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def build_index(vectors: np.ndarray, exact_limit: int = 50_000, nprobe: int = 16,
                use_gpu: bool | None = None):
    """An inner-product index over `vectors` ([n, d] float32): exact up to
    `exact_limit` rows, IVF-Flat with ~2*sqrt(n) lists above it.

    The IVF k-means runs 10 iterations on 40 points per list (FAISS's minimum
    without a warning): at 100k x 512 training then costs less than the search.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n <= exact_limit:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(2 * math.sqrt(n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        rng = np.random.default_rng(0)
        sample = vectors[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    if use_gpu is None:
        use_gpu = faiss_gpu_count() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index


def knn(vectors: np.ndarray, k: int, exact_limit: int = 50_000, nprobe: int = 16,
        threads: int = 0, batch: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Self k-nearest neighbours, excluding each point itself.

    Returns (similarities [n, k] float32, indices [n, k] int64); missing neighbours
    (fewer than k+1 points, or IVF lists too sparse) are -1 with similarity -inf.
    """
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    n = len(vectors)
    index = build_index(vectors, exact_limit=exact_limit, nprobe=nprobe)
    kk = min(k + 1, n)
    sims = np.full((n, k), -np.inf, np.float32)
    idx = np.full((n, k), -1, np.int64)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        d, i = index.search(np.ascontiguousarray(vectors[start:stop], np.float32), kk)
        self_hit = i == np.arange(start, stop)[:, None]
        # Drop the point itself; if it was not returned (ties, IVF), drop the last column.
        drop = np.where(self_hit.any(1), self_hit.argmax(1), kk - 1)
        keep = np.ones_like(self_hit)
        keep[np.arange(stop - start), drop] = False
        d = d[keep].reshape(stop - start, kk - 1)
        i = i[keep].reshape(stop - start, kk - 1)
        sims[start:stop, : kk - 1] = d
        idx[start:stop, : kk - 1] = i
    return sims, idx


def select_pairs(sims: np.ndarray, idx: np.ndarray, cfg: MiningConfig,
                 categories: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From kNN results, the pairs (ref_index, tgt_index, similarity) to keep.

    Rules: similarity in [lo, hi]; no self-pairs; one of (a, b)/(b, a) unless
    `keep_both_directions`; same category when asked; at most
    `max_pairs_per_image` pairs per image as reference (nearest first).
    Output is sorted by (ref, tgt) so that it does not depend on search order.
    """
    n, k = idx.shape
    ref = np.repeat(np.arange(n), k)
    tgt = idx.reshape(-1)
    sim = sims.reshape(-1)
    ok = (tgt >= 0) & (tgt != ref) & (sim >= cfg.lo) & (sim <= cfg.hi)
    if cfg.same_category:
        if categories is None:
            raise ValueError("same_category mining needs a category column in the corpus")
        codes = category_codes(categories)
        ok &= (codes[ref] >= 0) & (codes[ref] == codes[np.maximum(tgt, 0)])
    ref, tgt, sim = ref[ok], tgt[ok], sim[ok]
    if not cfg.keep_both_directions:
        # Canonical orientation: the lower index is the reference. A pair found from
        # both sides then appears twice and is deduplicated below.
        lo_, hi_ = np.minimum(ref, tgt), np.maximum(ref, tgt)
        ref, tgt = lo_, hi_
    order = np.lexsort((tgt, ref))
    ref, tgt, sim = ref[order], tgt[order], sim[order]
    first = np.ones(len(ref), bool)
    first[1:] = (ref[1:] != ref[:-1]) | (tgt[1:] != tgt[:-1])
    ref, tgt, sim = ref[first], tgt[first], sim[first]
    # Cap per reference, keeping the most similar (stable on ties by tgt index).
    order = np.lexsort((tgt, -sim, ref))
    ref, tgt, sim = ref[order], tgt[order], sim[order]
    starts = np.r_[0, np.flatnonzero(ref[1:] != ref[:-1]) + 1] if len(ref) else np.zeros(0, int)
    rank = np.arange(len(ref)) - np.repeat(starts, np.diff(np.r_[starts, len(ref)]))
    keep = rank < cfg.max_pairs_per_image
    ref, tgt, sim = ref[keep], tgt[keep], sim[keep]
    order = np.lexsort((tgt, ref))
    return ref[order], tgt[order], sim[order].astype(np.float32)


def category_codes(categories) -> np.ndarray:
    """Integer code per row for category strings; -1 where the category is null."""
    cats = np.asarray(["" if c is None else str(c) for c in categories], dtype=object)
    _, codes = np.unique(cats.astype(str), return_inverse=True)
    codes = codes.astype(np.int64)
    codes[np.asarray([c is None for c in categories], bool)] = -1
    return codes


def mine_pairs(ids, vectors: np.ndarray, cfg: MiningConfig, categories=None):
    """Mine pairs over (ids, vectors); returns a pyarrow Table in the pairs schema."""
    import pyarrow as pa

    from cir import schemas

    cfg.validate()
    ids = np.asarray(ids, dtype=object)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 embeddings to mine pairs, got {len(ids)}")
    t0 = time.perf_counter()
    sims, idx = knn(vectors, cfg.k, cfg.exact_limit, cfg.nprobe, cfg.threads)
    ref, tgt, sim = select_pairs(sims, idx, cfg, categories)
    log(f"mine: kNN k={cfg.k} over {len(ids)} vectors "
        f"({'exact' if len(ids) <= cfg.exact_limit else 'IVF'}) -> {len(ref)} pairs "
        f"in {time.perf_counter() - t0:.1f}s")
    ref_ids, tgt_ids = ids[ref], ids[tgt]
    return pa.table(
        {
            "pair_id": [f"{a}__{b}" for a, b in zip(ref_ids, tgt_ids)],
            "ref_id": list(ref_ids),
            "tgt_id": list(tgt_ids),
            "similarity": sim,
        },
        schema=schemas.PAIRS,
    )
