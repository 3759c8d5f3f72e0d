"""Pair mining against a brute-force numpy search."""
import numpy as np
import pytest

from cir.mining import MiningConfig, knn, mine_pairs, select_pairs


def _unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clustered(rng, n, d, n_clusters, spread=0.35):
    centres = _unit(rng, n_clusters, d)
    v = centres[rng.integers(n_clusters, size=n)] + spread * rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def brute_force_pairs(vectors, cfg: MiningConfig, categories=None):
    """The definition of mining, written the slow and obvious way."""
    n = len(vectors)
    sims = vectors @ vectors.T
    found = {}
    for a in range(n):
        order = [b for b in np.argsort(-sims[a], kind="stable") if b != a][: cfg.k]
        for b in order:
            s = sims[a, b]
            if not cfg.lo <= s <= cfg.hi:
                continue
            if cfg.same_category and (categories[a] is None or categories[a] != categories[b]):
                continue
            key = (a, b) if cfg.keep_both_directions else (min(a, b), max(a, b))
            found[key] = s
    per_ref = {}
    for (a, b), s in found.items():
        per_ref.setdefault(a, []).append((s, b))
    kept = set()
    for a, items in per_ref.items():
        items.sort(key=lambda t: (-t[0], t[1]))
        kept |= {(a, b) for _, b in items[: cfg.max_pairs_per_image]}
    return kept


@pytest.mark.parametrize("both", [False, True])
@pytest.mark.parametrize("same_category", [False, True])
def test_mining_matches_brute_force(both, same_category):
    rng = np.random.default_rng(7)
    v = _clustered(rng, 300, 32, 20)
    cats = [f"c{i % 3}" if i % 11 else None for i in range(300)]
    cfg = MiningConfig(k=8, lo=0.3, hi=0.97, max_pairs_per_image=4,
                       keep_both_directions=both, same_category=same_category)
    sims, idx = knn(v, cfg.k)
    ref, tgt, sim = select_pairs(sims, idx, cfg, cats)
    got = set(zip(ref.tolist(), tgt.tolist()))
    assert got == brute_force_pairs(v, cfg, cats)
    assert len(got) > 50  # the test data has pairs in the band
    assert all(a != b for a, b in got)
    if not both:
        assert not any((b, a) in got for a, b in got)
    np.testing.assert_allclose(sim, (v[ref] * v[tgt]).sum(1), atol=1e-5)


def test_knn_excludes_self_and_matches_numpy():
    rng = np.random.default_rng(0)
    v = _unit(rng, 500, 16)
    sims, idx = knn(v, 5)
    exact = v @ v.T
    np.fill_diagonal(exact, -np.inf)
    top = np.argsort(-exact, axis=1)[:, :5]
    assert (idx != np.arange(500)[:, None]).all()
    np.testing.assert_allclose(sims, np.take_along_axis(exact, top, 1), atol=1e-5)


def test_band_and_cap_rules():
    rng = np.random.default_rng(1)
    v = _clustered(rng, 400, 16, 10, spread=0.6)
    cfg = MiningConfig(k=10, lo=0.8, hi=0.95, max_pairs_per_image=2)
    table = mine_pairs([f"img{i:04d}" for i in range(400)], v, cfg)
    sim = table.column("similarity").to_numpy()
    assert table.num_rows > 0 and (sim >= 0.8).all() and (sim <= 0.95).all()
    refs = table.column("ref_id").to_pylist()
    assert max(refs.count(r) for r in set(refs)) <= 2
    assert len(set(table.column("pair_id").to_pylist())) == table.num_rows


def test_approximate_index_above_threshold_keeps_recall():
    rng = np.random.default_rng(3)
    v = _clustered(rng, 6000, 32, 150)
    exact_s, exact_i = knn(v, 10, exact_limit=10**9)
    approx_s, approx_i = knn(v, 10, exact_limit=1000, nprobe=16)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_i, approx_i)])
    assert recall >= 0.95, recall


@pytest.mark.parametrize("lo,hi,msg", [(0.9, 0.5, "lo > hi"), (0.5, 1.5, r"\[-1, 1\]")])
def test_bad_band_fails_with_a_clear_message(lo, hi, msg):
    with pytest.raises(ValueError, match=msg):
        MiningConfig(lo=lo, hi=hi).validate()


def test_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        mine_pairs(["a"], np.ones((1, 4), np.float32), MiningConfig())
