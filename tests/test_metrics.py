"""Metrics, ranking and submission files, on hand-made cases and the real annotations."""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from cir.benchmarks import Benchmark, Query, load_circo, load_cirr, load_fashioniq_all
from cir.metrics import (
    average_precision_at_k,
    circo_metrics,
    cirr_metrics,
    embedding_recall,
    evaluate_embeddings,
    evaluate_predictions,
    evaluate_ranked,
    fashioniq_average,
    fashioniq_metrics,
    rank_benchmark,
    rank_by_similarity,
    rank_candidates,
    recall_at_k,
    remove_ids,
    restrict_to,
    topk_from_scores,
)
from cir.submission import (
    circo_submission,
    cirr_submissions,
    predictions_from_ranked,
    read_predictions,
    write_circo_submission,
    write_cirr_submission,
)

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
needs_files = pytest.mark.skipif(not BENCH.is_dir(), reason=f"no benchmark files at {BENCH}")


# ---- hand-computed cases ------------------------------------------------------------------
def test_recall_hand_case():
    ranked = np.array([[3, 1, 2], [0, 1, 2], [1, 2, -1]])
    assert recall_at_k(ranked, [3, 2, 0], [1, 2, 3]) == pytest.approx({1: 100 / 3, 2: 100 / 3, 3: 200 / 3})


def test_remove_and_restrict():
    ranked = np.array([[5, 0, 7, 3, 1], [2, 9, -1, -1, -1]])
    assert remove_ids(ranked, [0, 9]).tolist() == [[5, 7, 3, 1, -1], [2, -1, -1, -1, -1]]
    assert restrict_to(ranked, [[1, 3, 0], [9, 4, -1]]).tolist() == [[0, 3, 1], [9, -1, -1]]


def test_cirr_reference_is_never_rewarded():
    ref, tgt = np.array([0]), np.array([3])
    subsets = np.array([[0, 1, 2, 3, 4, 5]])

    def m(row):
        return cirr_metrics(np.array([row]), tgt, ref, subsets=subsets)

    # reference first, target second: the reference is removed, so R@1 = 100
    assert m([0, 3, 1, 2]) == {**{f"recall@{k}": 100.0 for k in (1, 5, 10, 50)},
                               **{f"recall_subset@{k}": 100.0 for k in (1, 2, 3)}, "avg": 100.0}
    # reference first, then wrong images: the reference does not count either way
    out = m([0, 7, 8, 9, 6, 1, 3])
    assert out["recall@1"] == 0 and out["recall@5"] == 0 and out["recall@10"] == 100
    # subset: members in ranking order minus the reference are [1, 3, ...]
    assert out["recall_subset@1"] == 0 and out["recall_subset@2"] == 100
    assert out["avg"] == 0
    # target after 4 non-members and the reference: R@5 = 100, subset R@1 = 100
    out = m([6, 7, 0, 8, 9, 3, 1])
    assert out["recall@1"] == 0 and out["recall@5"] == 100 and out["recall_subset@1"] == 100
    assert out["avg"] == 100
    # an explicit subset ranking that lists the reference first
    out = cirr_metrics(np.array([[3]]), tgt, ref, subset_ranked=np.array([[0, 2, 3]]))
    assert out["recall_subset@1"] == 0 and out["recall_subset@2"] == 100


def test_fashioniq_keeps_the_reference():
    ranked = np.array([[0] + list(range(10, 19)) + [3]])  # ref, 9 others, target 11th
    assert fashioniq_metrics(ranked, [3]) == {"recall@10": 0.0, "recall@50": 100.0}
    avg = fashioniq_average({"dress": {"recall@10": 10.0, "recall@50": 40.0},
                             "shirt": {"recall@10": 20.0, "recall@50": 50.0},
                             "toptee": {"recall@10": 30.0, "recall@50": 60.0}})
    assert avg["recall@10"] == 20 and avg["recall@50"] == 50 and avg["avg"] == 35
    assert avg["shirt/recall@50"] == 50


def test_circo_ap_hand_case():
    # gts {1, 2, 3}; ranking 1 x 2 y 3: precisions at hits 1/1, 2/3, 3/5
    ranked = np.array([[1, 9, 2, 8, 3]])
    ap = average_precision_at_k(ranked, [[1, 2, 3]], [1, 2, 3, 5])
    assert ap[0].tolist() == pytest.approx([1 / 1, 1 / 2, (1 + 2 / 3) / 3, (1 + 2 / 3 + 3 / 5) / 3])
    # one gt found at rank 4: AP@5 = (1/4) / min(5, 1)
    out = circo_metrics(np.array([[7, 8, 9, 4, 5, 6]]), [[4, -1]], aspects=[("negation",)])
    assert out["map@5"] == pytest.approx(25.0) and out["map@50"] == pytest.approx(25.0)
    assert out["recall@5"] == 100 and out["semantic_map@10/negation"] == pytest.approx(25.0)
    # a repeated gt counts twice, as in the official evaluation.py
    assert average_precision_at_k(np.array([[1, 1]]), [[1, 2]], [2])[0, 0] == pytest.approx(1.0)


# ---- oracle rankings on the real files -----------------------------------------------------
@needs_files
def test_oracle_scores_100_everywhere():
    cirr = load_cirr("val", BENCH / "cirr")
    m = evaluate_ranked(cirr, cirr.target_indices())
    assert set(m) == {"recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1",
                      "recall_subset@2", "recall_subset@3", "avg"}
    assert all(v == 100 for v in m.values())

    per_cat = {c: evaluate_ranked(b, b.target_indices())
               for c, b in load_fashioniq_all("val", BENCH / "fashioniq").items()}
    assert all(v == 100 for v in fashioniq_average(per_cat).values())

    circo = load_circo("val", BENCH / "circo")
    preds = {q.query_id: list(q.target_ids) for q in circo.queries}
    m = evaluate_predictions(circo, preds)
    assert len(m) == 8 + 9 and all(v == pytest.approx(100) for v in m.values())


@needs_files
def test_cirr_predictions_mode_removes_the_reference():
    cirr = load_cirr("val", BENCH / "cirr")
    preds = {q.query_id: [q.ref_id, q.target_ids[0]] for q in cirr.queries}
    assert evaluate_predictions(cirr, preds)["recall@1"] == 100
    wrong = {q.query_id: [q.ref_id] + [m for m in q.subset_ids if m not in (q.ref_id, q.target_ids[0])]
             for q in cirr.queries}
    out = evaluate_predictions(cirr, wrong)
    assert out["recall@50"] == 0 and out["recall_subset@3"] == 0
    with pytest.raises(KeyError, match="not in the gallery"):
        evaluate_predictions(cirr, {**preds, cirr.queries[0].query_id: ["nope"]})
    with pytest.raises(ValueError, match="1 of 4181 queries missing"):
        evaluate_predictions(cirr, dict(list(preds.items())[1:]))


@needs_files
def test_embeddings_mode_matches_the_protocols():
    # one-hot gallery: query = 2 * reference + target, so the reference scores 2,
    # the target 1 and every other image 0
    # (the first 300 queries: a one-hot gallery makes d = G, so the matmul is Q * G^2)
    cirr = load_cirr("val", BENCH / "cirr")
    cirr = dataclasses.replace(cirr, queries=cirr.queries[:300])
    g = np.eye(len(cirr.gallery_ids), dtype=np.float32)
    q = 2 * g[cirr.reference_indices()] + g[cirr.target_indices()[:, 0]]
    assert all(v == 100 for v in evaluate_embeddings(cirr, q, g).values())
    kept = evaluate_embeddings(cirr, q, g, exclude_reference=False)  # CIRR still drops it
    assert kept["recall@1"] == 100

    fiq = load_fashioniq_all("val", BENCH / "fashioniq")["dress"]
    fiq = dataclasses.replace(fiq, queries=fiq.queries[:300])
    g = np.eye(len(fiq.gallery_ids), dtype=np.float32)
    q = 2 * g[fiq.reference_indices()] + g[fiq.target_indices()[:, 0]]
    assert evaluate_embeddings(fiq, q, g)["recall@10"] == 100  # FashionIQ keeps the reference:
    assert (rank_by_similarity(q, g, 2)[:, 1] == fiq.target_indices()[:, 0]).all()
    # ... so a ranking with the reference first and the target 10th misses Recall@10
    q = 2 * g[fiq.reference_indices()]
    q[:, :9] += 1.5  # nine other images between reference and target
    q += g[fiq.target_indices()[:, 0]]
    assert evaluate_embeddings(fiq, q, g)["recall@10"] < 5
    assert evaluate_embeddings(fiq, q, g, exclude_reference=True)["recall@10"] > 95


# ---- CIRCO: the official example file against the official formula --------------------------
def _official_circo(predictions: dict, annotations: list, ranks=(5, 10, 25, 50)):
    """Plain-Python transcription of miccunifi/CIRCO src/evaluation.py `compute_metrics`:
    labels = isin(predictions, gt_img_ids); precisions = cumsum(labels) * labels / (i + 1);
    AP@r = sum(precisions[:r]) / min(len(gt_img_ids), r); Recall@r on target_img_id;
    semantic AP@10 per aspect; all averaged over the queries, then * 100."""
    by_id = {a["id"]: a for a in annotations}
    aps, recalls, semantic = defaultdict(list), defaultdict(list), defaultdict(list)
    for query_id, preds in predictions.items():
        ann = by_id[int(query_id)]
        gts, target = ann["gt_img_ids"], ann["target_img_id"]
        labels = [1 if int(p) in gts else 0 for p in preds]
        precisions, found = [], 0
        for i, label in enumerate(labels):
            found += label
            precisions.append(found * label / (i + 1))
        for r in ranks:
            aps[r].append(sum(precisions[:r]) / min(len(gts), r))
            recalls[r].append(sum(1 for p in preds[:r] if int(p) == target))
        for aspect in ann["semantic_aspects"]:
            semantic[aspect].append(sum(precisions[:10]) / min(len(gts), 10))
    out = {f"map@{r}": sum(v) / len(v) * 100 for r, v in aps.items()}
    out.update({f"recall@{r}": sum(v) / len(v) * 100 for r, v in recalls.items()})
    out.update({f"semantic_map@10/{a}": sum(v) / len(v) * 100 for a, v in semantic.items()})
    return out


@needs_files
def test_circo_example_submission_matches_official_formula():
    path = BENCH / "circo/submission_examples/submission_val.json"
    circo = load_circo("val", BENCH / "circo")
    official = _official_circo(json.loads(path.read_text()),
                               json.loads((BENCH / "circo/annotations/val.json").read_text()))
    ours = evaluate_predictions(circo, read_predictions(path, circo))
    assert set(ours) == set(official)
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    # a second, stronger ranking: gts shuffled into random positions of the example lists
    rng = np.random.default_rng(1)
    mixed = {}
    for q, ann in zip(circo.queries, json.loads((BENCH / "circo/annotations/val.json").read_text())):
        lst = [int(i) for i in json.loads(path.read_text())[q.query_id]]
        for g in ann["gt_img_ids"][: rng.integers(1, len(ann["gt_img_ids"]) + 1)]:
            lst.insert(int(rng.integers(0, 12)), g)
        mixed[q.query_id] = lst[:50]
    mixed["0"] = [int(circo.queries[0].target_ids[0])] * 3 + mixed["0"][:47]  # duplicates count
    official = _official_circo(mixed, json.loads((BENCH / "circo/annotations/val.json").read_text()))
    ours = evaluate_predictions(circo, mixed)
    assert official["map@10"] > 10
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


# ---- ranking ---------------------------------------------------------------------------------
def _check_topk(scores, top, k):
    """top holds, best first, the k largest scores of each row (ties in any order).
    Scores of a chunked matmul may differ from `scores` in the last bit, hence rtol."""
    best = -np.sort(-scores, axis=1)[:, :k]
    got = np.take_along_axis(scores, top.astype(np.int64), axis=1)
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == k for row in top.tolist())


@pytest.mark.parametrize("g,k", [(20000, 50), (5003, 7), (1000, 10), (300, 300), (64, 100)])
def test_rank_by_similarity_is_exact(g, k):
    rng = np.random.default_rng(g)
    qe = rng.standard_normal((200, 16)).astype(np.float32)
    ge = rng.standard_normal((g, 16)).astype(np.float32)
    ge[::7] = ge[3]  # exact ties
    top = rank_by_similarity(qe, ge, k, chunk=64)
    assert top.shape == (200, min(k, g)) and top.dtype == np.int32
    _check_topk(qe @ ge.T, top, min(k, g))
    scores = qe @ ge.T
    exact = topk_from_scores(scores, k, chunk=33)
    np.testing.assert_array_equal(np.take_along_axis(scores, exact.astype(np.int64), axis=1),
                                  -np.sort(-scores, axis=1)[:, : min(k, g)])


def test_rank_excludes_and_pads():
    rng = np.random.default_rng(0)
    qe = rng.standard_normal((50, 8)).astype(np.float32)
    ge = rng.standard_normal((6000, 8)).astype(np.float32)
    plain = rank_by_similarity(qe, ge, 10)
    excl = rank_by_similarity(qe, ge, 10, exclude=plain[:, 0])
    np.testing.assert_array_equal(excl[:, :9], plain[:, 1:])
    small = rank_by_similarity(qe[:2], ge[:3], 5, exclude=[[0, 1], [2, -1]])
    assert small[0].tolist()[1:] == [-1, -1] and small[0, 0] == 2 and -1 in small[1]
    with pytest.raises(ValueError, match="NaN"):
        rank_by_similarity(np.full((1, 8), np.nan, np.float32), ge, 5)
    cand = rank_candidates(qe[:1], ge, [[4, 5, 6, -1]], exclude=[5])
    s = ge[[4, 6]] @ qe[0]
    assert cand[0].tolist() == ([4, 6] if s[0] >= s[1] else [6, 4]) + [-1, -1]


def test_rank_10k_by_100k_is_exact():
    """10k queries x 100k gallery (4 GB of scores if held at once) ranks in seconds, and
    is the brute-force top 50 with the excluded column left out (checked on 100 queries)."""
    rng = np.random.default_rng(0)
    qe = rng.standard_normal((10_000, 32)).astype(np.float32)
    ge = rng.standard_normal((100_000, 32)).astype(np.float32)
    excluded = rng.permutation(100_000)[:10_000]
    ge[excluded] = qe  # like a reference: each query's excluded row would be its best match
    top = rank_by_similarity(qe, ge, 50, exclude=excluded)
    assert top.shape == (10_000, 50) and (top >= 0).all()
    assert not (top == excluded[:, None]).any()
    sample = np.sort(rng.choice(10_000, size=100, replace=False))
    scores = qe[sample] @ ge.T
    assert (scores.argmax(axis=1) == excluded[sample]).mean() > 0.9
    scores[np.arange(100), excluded[sample]] = -np.inf
    _check_topk(scores, top[sample], 50)


def test_embedding_recall():
    gallery = np.eye(4, dtype=np.float32)
    queries = gallery[[0, 1, 2]] + np.float32(0.5) * gallery[[3, 3, 0]]  # 2nd best: 3, 3, 0
    assert embedding_recall(queries, gallery, [0, 3, 1], [1, 2]) == pytest.approx({1: 100 / 3, 2: 200 / 3})
    # excluding each query's best row moves the second best up
    assert embedding_recall(queries, gallery, [3, 3, 0], [1], exclude=[0, 1, 2]) == {1: 100.0}


# ---- submission files ------------------------------------------------------------------------
@needs_files
def test_cirr_submission_roundtrip(tmp_path):
    test = load_cirr("test1", BENCH / "cirr")
    rng = np.random.default_rng(0)
    g = rng.standard_normal((len(test.gallery_ids), 16)).astype(np.float32)
    q = g[test.reference_indices()] * 5 + rng.standard_normal((len(test), 16)).astype(np.float32)
    ranked, subset_ranked = rank_benchmark(test, q, g)  # CIRR: reference excluded
    recall, subset = predictions_from_ranked(test, ranked), predictions_from_ranked(test, subset_ranked)
    p1, p2 = write_cirr_submission(test, recall, subset, tmp_path / "sub.json")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sub.json", "subset_sub.json"]
    main, sub = json.loads(p1.read_text()), json.loads(p2.read_text())
    assert main["version"] == sub["version"] == "rc2"
    assert main["metric"] == "recall" and sub["metric"] == "recall_subset"
    assert len(main) == len(sub) == len(test) + 2
    for qq in test.queries:
        lst, sl = main[qq.query_id], sub[qq.query_id]
        assert len(lst) == len(set(lst)) == 50 and len(sl) == len(set(sl)) == 3
        assert qq.ref_id not in lst and qq.ref_id not in sl and set(sl) <= set(qq.subset_ids)
    assert read_predictions(p1, test) == {k: v for k, v in main.items() if k not in ("version", "metric")}

    q0 = test.queries[0]
    bad = dict(recall)
    bad[q0.query_id] = [q0.ref_id] + recall[q0.query_id][:49]
    with pytest.raises(ValueError, match="lists its reference"):
        cirr_submissions(test, bad, subset)
    bad[q0.query_id] = recall[q0.query_id][:1] * 50
    with pytest.raises(ValueError, match="more than once"):
        cirr_submissions(test, bad, subset)
    with pytest.raises(ValueError, match="1 of 4148 queries missing"):
        cirr_submissions(test, {k: v for k, v in recall.items() if k != q0.query_id}, subset)
    bad_sub = dict(subset)
    bad_sub[q0.query_id] = [test.gallery_ids[-1]] + subset[q0.query_id][:2]
    if test.gallery_ids[-1] not in q0.subset_ids:
        with pytest.raises(ValueError, match="not a member of its img_set"):
            cirr_submissions(test, recall, bad_sub)
    with pytest.raises(ValueError, match="expects 50"):
        cirr_submissions(test, {**recall, q0.query_id: recall[q0.query_id][:10]}, subset)


@needs_files
def test_circo_submission(tmp_path):
    example = BENCH / "circo/submission_examples/submission_val.json"
    val = load_circo("val", BENCH / "circo")
    preds = read_predictions(example, val)
    path = write_circo_submission(val, preds, tmp_path / "circo.json")
    assert json.loads(path.read_text()) == json.loads(example.read_text())  # int ids, same lists
    with pytest.raises(ValueError, match="more than once"):
        circo_submission(val, {**preds, "0": preds["0"][:1] * 50})
    with pytest.raises(ValueError, match="1 of 220 queries missing"):
        circo_submission(val, {k: v for k, v in preds.items() if k != "3"})
    with pytest.raises(ValueError, match="not a COCO image id"):
        circo_submission(val, {**preds, "0": ["abc"] + preds["0"][1:]})
    with pytest.raises(ValueError, match="1 unknown query ids"):
        circo_submission(val, {**preds, "999": preds["0"]})

    test = load_circo("test", BENCH / "circo")
    ranked = np.tile(np.arange(60), (len(test), 1))
    gallery = [str(100000 + i) for i in range(60)]
    test_g = dataclasses.replace(test, gallery_ids=gallery)
    sub = circo_submission(test_g, predictions_from_ranked(test_g, ranked))
    assert len(sub) == 800 and all(v == list(range(100000, 100050)) for v in sub.values())


def test_read_predictions_errors(tmp_path):
    bench = Benchmark("toy", "val", [Query("a", "r", "t", ("x",)), Query("b", "r", "t", ("y",))],
                      ["r", "x", "y"])
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"version": "rc2", "metric": "recall", "a": ["x"], "c": ["y"]}))
    msg = r"1 of 2 queries missing \(e\.g\. \['b'\]\).*unknown query ids \(e\.g\. \['c'\]\)"
    with pytest.raises(ValueError, match=msg):
        read_predictions(p, bench)
    assert read_predictions(p) == {"a": ["x"], "c": ["y"]}
    p.write_text(json.dumps({"a": "x"}))
    with pytest.raises(ValueError, match="query 'a' should map to a list"):
        read_predictions(p)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        read_predictions(tmp_path / "nothere.json")
    assert evaluate_predictions(bench, {"a": ["r", "x"], "b": ["y"]}) == {
        "recall@1": 50.0, "recall@5": 100.0, "recall@10": 100.0, "recall@50": 100.0}
