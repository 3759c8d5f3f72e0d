"""Sharded indexes: the merged top-k is exactly one index's (ties by id); the index type
chosen from size and memory budget (IVF-PQ, HNSW too), mapped where it can be; training
on GPUs when FAISS sees any; the folder's manifest, checksums and encoder checks;
nothing half-written."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cir.index.build import (MIB, IndexMismatch, IndexParams, IndexPlan, check_encoder, load_shard, plan_index,
                             read_manifest, train_index, use_gpu, write_index)
from cir.index.search import ShardedIndex


def gallery(n: int, d: int, seed: int, ties: int = 0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    if ties:
        v[n - ties:] = v[0]                     # many rows equal to row 0: ties across shards
    ids = [f"img-{i:06d}" for i in rng.permutation(n)]
    return ids, v


def exact_topk(ids, vectors, query, k):
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    order = np.lexsort((np.asarray(ids, dtype=object), -scores))[:k]
    return [ids[i] for i in order]


@pytest.mark.parametrize("n_shards, k, ties", [(1, 10, 0), (3, 10, 0), (4, 25, 40), (7, 5, 40), (2, 1, 40)])
def test_sharded_topk_equals_one_exact_index(tmp_path, n_shards, k, ties):
    ids, v = gallery(900, 24, seed=n_shards, ties=ties)
    write_index(tmp_path / "ix", ids, v, "cir-shapes", n_shards)
    index = ShardedIndex.load(tmp_path / "ix")
    queries = np.vstack([v[0], v[5], v[-1], np.random.default_rng(1).normal(size=24).astype(np.float32)])
    for query, (scores, found) in zip(queries, index.search(queries, k)):
        assert list(found) == exact_topk(ids, v, query, k)
        assert np.all(np.diff(scores) <= 0)


def test_large_shards_get_an_ivf_index_with_high_recall(tmp_path):
    ids, v = gallery(4000, 32, seed=0)
    manifest = write_index(tmp_path / "ix", ids, v, "cir-shapes", 2, IndexParams(flat_limit=1000, nprobe=4))
    # nprobe is tuned up from 4 until the shard's own recall target (0.96) is met.
    assert all(s["factory"].startswith("IVF") and s["search"]["nprobe"] >= 4 for s in manifest["shards"])
    index = ShardedIndex.load(tmp_path / "ix")
    queries = v[:50]
    hits = [len(set(found) & set(exact_topk(ids, v, q, 10))) for q, (_, found) in zip(queries, index.search(queries, 10))]
    assert np.mean(hits) / 10 >= 0.9


def test_manifest_names_encoder_shards_and_checksums(tmp_path):
    ids, v = gallery(100, 8, seed=0)
    write_index(tmp_path / "ix", ids, v, "checkpoint:runs/x/export", 2)
    m = read_manifest(tmp_path / "ix")
    assert (m["encoder"], m["dim"], m["metric"], m["rows"]) == ("checkpoint:runs/x/export", 8, "inner_product", 100)
    assert sum(s["rows"] for s in m["shards"]) == 100 and min(s["rows"] for s in m["shards"]) > 30
    assert all(len(s["sha256"]) == 2 for s in m["shards"])
    check_encoder(m, "checkpoint:runs/x/export", 8)
    with pytest.raises(IndexMismatch, match="rebuild the index"):
        check_encoder(m, "cir-shapes", 8)
    with pytest.raises(IndexMismatch, match="dim 8"):
        check_encoder(m, "checkpoint:runs/x/export", 16)


def test_a_corrupt_shard_is_refused(tmp_path):
    ids, v = gallery(100, 8, seed=0)
    write_index(tmp_path / "ix", ids, v, "cir-shapes", 2)
    shard = tmp_path / "ix" / "shard-001.faiss"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    load_shard(tmp_path / "ix", 0)                     # the other shard is fine
    with pytest.raises(IndexMismatch, match="shard-001.faiss is missing or corrupt"):
        load_shard(tmp_path / "ix", 1)


def test_an_existing_index_is_never_overwritten_and_failures_leave_nothing(tmp_path):
    ids, v = gallery(100, 8, seed=0)
    write_index(tmp_path / "ix", ids, v, "cir-shapes", 2)
    before = (tmp_path / "ix" / "manifest.json").read_text()
    with pytest.raises(FileExistsError):
        write_index(tmp_path / "ix", ids, v, "cir-shapes", 3)
    assert (tmp_path / "ix" / "manifest.json").read_text() == before
    with pytest.raises(ValueError, match="empty"):
        write_index(tmp_path / "ix2", ids[:3], v[:3], "cir-shapes", 8)
    with pytest.raises(ValueError, match="unique"):
        write_index(tmp_path / "ix2", ids[:2] + ids[:1], v[:3], "cir-shapes", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


def test_bad_k_is_refused(tmp_path):
    ids, v = gallery(20, 8, seed=0)
    write_index(tmp_path / "ix", ids, v, "cir-shapes", 1)
    with pytest.raises(ValueError, match="k must be"):
        ShardedIndex.load(tmp_path / "ix").search(v[:1], 0)


def test_auto_picks_flat_ivf_flat_or_ivf_pq_from_size_and_budget():
    assert plan_index(IndexParams(), 50_000, 128) == IndexPlan("flat")
    ivf = plan_index(IndexParams(), 100_000, 128)
    assert ivf.factory == "IVF1264,Flat" and ivf.memory_bytes(100_000, 128) == 100_000 * (512 + 16) + 1264 * 512
    # A budget IVF-Flat overflows: the largest PQ code (m < dim, dividing it) that fits.
    for budget in (40, 8, 5):
        plan = plan_index(IndexParams(memory_budget_mb=budget), 100_000, 128)
        larger = [m for m in (64, 32, 16, 8, 4) if m > plan.pq_m]
        assert plan.kind == "ivf_pq" and plan.memory_bytes(100_000, 128) <= budget * MIB
        assert all(IndexPlan("ivf_pq", plan.nlist, m).memory_bytes(100_000, 128) > budget * MIB for m in larger)
    assert [plan_index(IndexParams(memory_budget_mb=b), 100_000, 128).pq_m for b in (40, 8, 5)] == [64, 32, 16]
    # A small shard over the budget as Flat is quantised too; below 10k rows it cannot be.
    assert plan_index(IndexParams(memory_budget_mb=5), 20_000, 128).factory == "IVF512,PQ64x8"
    with pytest.raises(ValueError, match=r"needs at least 4.39 MiB \(Flat\).*memory_budget_mb=4"):
        plan_index(IndexParams(memory_budget_mb=4), 9_000, 128)
    with pytest.raises(ValueError, match=r"needs at least .* MiB \(IVF1264,PQ4x8\).*use more shards"):
        plan_index(IndexParams(memory_budget_mb=1), 100_000, 128)
    assert plan_index(IndexParams(kind="hnsw"), 1000, 128).factory == "HNSW32"
    with pytest.raises(ValueError, match=r"\(HNSW32\)"):
        plan_index(IndexParams(kind="hnsw", memory_budget_mb=50), 100_000, 128)
    with pytest.raises(ValueError, match="divisible"):
        plan_index(IndexParams(kind="ivf_pq"), 100_000, 7)
    for bad in (IndexParams(kind="ivf"), IndexParams(gpu="yes"), IndexParams(memory_budget_mb=-1)):
        with pytest.raises(ValueError):
            bad.validate()


def families(n: int, d: int, seed: int):
    """Unit vectors in families within families, like embeddings of a real collection:
    neighbours a quantised index can still tell apart."""
    rng = np.random.default_rng(seed)
    tops = rng.normal(size=(n // 100, d))
    subs = tops[rng.integers(len(tops), size=n // 10)] + 0.5 * rng.normal(size=(n // 10, d))
    v = subs[rng.integers(len(subs), size=n)] + 0.3 * rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def mapped(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


@pytest.fixture(scope="module")
def families_gallery():
    """22k vectors with 41 equal rows (hashed into both shards), 100 held-out queries and
    their exact top-10 rows."""
    v = families(22_100, 32, seed=0)
    queries, v = v[22_000:], v[:22_000]
    v[-40:] = v[0]
    ids = [f"img-{i:06d}" for i in np.random.default_rng(1).permutation(len(v))]
    return ids, v, queries, np.argsort(-(queries @ v.T), axis=1)[:, :10]


@pytest.mark.parametrize("kind, factory, mmap", [("flat", "Flat", True), ("ivf_flat", r"IVF\d+,Flat", True),
                                                 ("ivf_pq", r"IVF\d+,PQ16x8", True), ("hnsw", "HNSW32", False)])
def test_every_kind_reaches_recall_loads_back_and_merges_ties_exactly(tmp_path, families_gallery, kind, factory,
                                                                       mmap):
    ids, v, queries, truth = families_gallery
    manifest = write_index(tmp_path / "ix", ids, v, "cir-shapes", 2, IndexParams(kind=kind))
    for s in manifest["shards"]:
        assert re.fullmatch(factory, s["factory"]) and s["estimated_memory_mb"] > 0
        # The estimate is what the shard takes: its file holds the same lists, codes and maps.
        assert 0.8 < (tmp_path / "ix" / s["index"]).stat().st_size / (s["estimated_memory_mb"] * MIB) < 1.2
    index = ShardedIndex.load(tmp_path / "ix")
    assert all(mapped(tmp_path / "ix" / s["index"]) == mmap for s in manifest["shards"])
    # Rescoring reconstructs rows: exact for flat storage, PQ's decoded vectors otherwise.
    shard, ids0 = index.shards[0].index, index.shards[0].ids
    rows = np.arange(0, shard.ntotal, 997)
    decoded = shard.reconstruct_batch(rows)
    original = v[[ids.index(i) for i in ids0[rows]]]
    assert np.min(np.sum(decoded * original, axis=1)) > (0.95 if kind == "ivf_pq" else 1 - 1e-6)
    found = index.search(queries, 10)
    recall = np.mean([len(set(top) & {ids[i] for i in rows}) / 10 for rows, (_, top) in zip(truth, found)])
    assert recall >= 0.9, recall
    # The equal rows tie in every shard (one quantiser for all), so they merge by id, as brute force orders them.
    scores, top = index.search(v[:1], 10)[0]
    assert list(top) == exact_topk(ids, v, v[0], 10) and np.all(scores == scores[0])


def test_gpu_use_asks_faiss_and_true_requires_a_gpu(monkeypatch):
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert not use_gpu("auto") and not use_gpu(False)
    with pytest.raises(ValueError, match="FAISS sees no GPU"):
        use_gpu(True)
    monkeypatch.delattr(faiss, "get_num_gpus")          # a faiss build without GPU support at all
    assert not use_gpu("auto")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    assert use_gpu("auto") and use_gpu(True) and not use_gpu(False)


def test_gpu_training_assigns_with_gpu_indexes_and_leaves_a_cpu_index(monkeypatch):
    import faiss

    moved = []

    def to_gpus(index):                                 # stands in for the GPUs: keeps the index on the CPU
        moved.append((type(index).__name__, index.d, index.metric_type))
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    sample = families(3_000, 16, seed=2)
    index = faiss.deserialize_index(train_index(IndexPlan("ivf_pq", 16, 4), 16, sample, "auto"))
    assert moved == [("IndexFlat", 16, faiss.METRIC_INNER_PRODUCT), ("IndexFlatL2", 4, faiss.METRIC_L2)]
    assert index.is_trained and type(index).__name__ == "IndexIVFPQ" and index.clustering_index is None
    moved.clear()
    train_index(IndexPlan("ivf_pq", 16, 4), 16, sample, False)
    assert moved == []


def test_a_too_small_budget_is_refused_before_any_work(tmp_path, monkeypatch):
    import cir.index.build as build

    monkeypatch.setattr(build, "train_index", lambda *a: pytest.fail("training started"))
    ids, v = gallery(9_000, 64, seed=0)
    with pytest.raises(ValueError, match=r"needs at least 2.2 MiB \(Flat\), over index.memory_budget_mb=1"):
        write_index(tmp_path / "ix", ids, v, "cir-shapes", 1, IndexParams(memory_budget_mb=1))
    assert not any(tmp_path.iterdir())
