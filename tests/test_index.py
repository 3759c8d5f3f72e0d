"""Sharded indexes: the merged top-k is exactly one index's (ties by id); the folder's
manifest, checksums and encoder checks; nothing half-written."""
from __future__ import annotations

import numpy as np
import pytest

from cir.index.build import IndexMismatch, IndexParams, check_encoder, load_shard, read_manifest, write_index
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
    # nprobe is tuned up from 4 until the shard's own recall target (0.95) is met.
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
