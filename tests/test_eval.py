"""Evaluation: the shapes benchmark reader, the eval job end to end under local Ray,
predictions mode on the real annotation files (CIRCO's official sample, CIRR oracles,
a CIRR test1 submission), and the job's error messages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cir.benchmarks import benchmark_names, load_benchmark
from cir.benchmarks.shapes import load_shapes
from cir.data.shapes_corpus import write_benchmark
from cir.encoders import decode_image
from conftest import REPO, SHARED_BENCHMARKS, load_job

needs_shared = pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(),
                                  reason=f"no benchmark files at {SHARED_BENCHMARKS}")


JOB = load_job("eval")


def run_job(*argv) -> int:
    return JOB.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("shapes") / "bench", seed=1,
                           n_train=20, n_val=20, n_test=40)


# ---- the shapes reader ------------------------------------------------------------------
def test_shapes_reader(shapes_root):
    manifest = json.loads((shapes_root / "manifest.json").read_text())
    assert "shapes" in benchmark_names()
    for split, n in (("val", 20), ("test", 40)):
        bench = load_benchmark("shapes", split, shapes_root)
        assert len(bench.queries) == n == manifest["splits"][split]["queries"]
        assert len(bench.gallery_ids) == manifest["splits"][split]["gallery"] >= 2 * n
        assert bench.protocol == "recall" and bench.exclude_reference and bench.has_targets
        assert bench.target_indices().min() >= 0 and bench.reference_indices().min() >= 0
        captions = bench.meta["captions"]
        for q in bench.queries:
            assert len(q.target_ids) == 1 and q.target_ids[0] != q.ref_id
            assert q.text and q.query_id.startswith(f"{split}-query-")
            assert captions[q.ref_id] != captions[q.target_ids[0]]
        image = decode_image(bench.image_bytes(bench.queries[0].target_ids[0]))
        assert image.size == (64, 64) and image.mode == "RGB"
    with pytest.raises(ValueError, match="unknown split"):
        load_shapes("dev", shapes_root)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_shapes("test", shapes_root.parent / "nope")
    with pytest.raises(ValueError, match="gallery.parquet"):
        load_shapes("test", shapes_root, image_dir=shapes_root)


def test_default_shapes_benchmark_is_written_once(tmp_path, monkeypatch):
    from cir.benchmarks.shapes import DEFAULT_ROOT, ShapesBenchmarkConfig, shapes_benchmark_root

    monkeypatch.chdir(tmp_path)
    small = ShapesBenchmarkConfig(n_train=2, n_val=2, n_test=5)
    root = shapes_benchmark_root(None, small)
    assert root == Path(DEFAULT_ROOT) and (tmp_path / root / "manifest.json").is_file()
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert shapes_benchmark_root(None, small) == root
    assert shapes_benchmark_root(DEFAULT_ROOT, small) == root  # the default folder, named
    assert (root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert len(load_shapes("test", root).queries) == 5
    with pytest.raises(ValueError, match="delete"):
        shapes_benchmark_root(None, ShapesBenchmarkConfig(seed=2, n_train=2, n_val=2, n_test=5))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        shapes_benchmark_root(tmp_path / "elsewhere")


# ---- ranking and scoring (no Ray) ----------------------------------------------------------
def test_scoring_excludes_the_reference_and_matches_evaluate_embeddings(shapes_root):
    from cir.evaluation import score_embeddings
    from cir.metrics import evaluate_embeddings

    bench = load_shapes("test", shapes_root)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(len(bench.gallery_ids), 16)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    tgt, ref = bench.target_indices()[:, 0], bench.reference_indices()
    oracle = score_embeddings(bench, g[tgt], g)
    assert oracle.metrics == {"recall@1": 100.0, "recall@5": 100.0, "recall@10": 100.0, "recall@50": 100.0}
    # Querying with the reference itself: it would be rank 1, but the protocol removes it.
    image_only = score_embeddings(bench, g[ref], g)
    assert image_only.metrics["recall@1"] < 100
    for q in bench.queries:
        ids = image_only.predictions[q.query_id]
        assert q.ref_id not in ids and len(ids) == 50 and len(set(ids)) == 50
    noisy = g[tgt] + rng.normal(scale=0.7, size=g[tgt].shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    assert score_embeddings(bench, noisy, g).metrics == evaluate_embeddings(bench, noisy, g)


# ---- the job end to end (Ray) --------------------------------------------------------------
def test_eval_job_shapes_end_to_end(ray_session, shapes_root, tmp_path, capsys):
    out = tmp_path / "sum"
    assert run_job("--benchmark", "shapes", "--split", "test", "--data", shapes_root,
                   "--model", "baseline:sum", "--encoder", "cir-tiny", "--output", out) == 0
    printed = capsys.readouterr().out
    assert "recall@10" in printed and "baseline:sum" in printed
    doc = json.loads((out / "metrics.json").read_text())
    assert (doc["benchmark"], doc["split"], doc["model"], doc["encoder"]) == \
        ("shapes", "test", "baseline:sum", "cir-tiny")
    assert doc["counts"]["shapes"]["queries"] == 40
    m = doc["metrics"]
    assert set(m) == {"recall@1", "recall@5", "recall@10", "recall@50"}
    assert all(0 <= v <= 100 for v in m.values())
    assert m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= m["recall@50"]
    assert doc["time"]["total"] > 0 and doc["info"]["encode"]["rows"] == 40 + doc["counts"]["shapes"]["gallery"]
    bench = load_shapes("test", shapes_root)
    preds = json.loads((out / "predictions.json").read_text())
    assert set(preds) == set(bench.query_ids)
    assert all(len(v) == 50 and q.ref_id not in v for q, v in zip(bench.queries, preds.values()))
    # The predictions it wrote score the same in predictions mode (no model, no Ray work).
    out2 = tmp_path / "again"
    assert run_job("--benchmark", "shapes", "--data", shapes_root, "--predictions",
                   out / "predictions.json", "--output", out2) == 0
    again = json.loads((out2 / "metrics.json").read_text())
    assert again["metrics"] == pytest.approx(m) and again["mode"] == "predictions"


def fake_cirr(root: Path, n_images: int = 14, n_queries: int = 5) -> Path:
    """A CIRR-format test1 split (annotations + PNG files) on shapes images."""
    from cir.data.shapes import random_scene, render

    rng = np.random.default_rng(5)
    names = [f"test1-{i}-0-img0" for i in range(n_images)]
    (root / "images" / "test1").mkdir(parents=True)
    for i, name in enumerate(names):
        render(random_scene(rng, 1, 4), 64, seed=i).save(root / "images" / "test1" / f"{name}.png")
    entries = []
    for k in range(n_queries):
        members = [names[(k + j) % n_images] for j in range(6)]
        entries.append({"pairid": 100 + k, "reference": members[0], "caption": f"make it {k}",
                        "img_set": {"id": k, "members": members}})
    for sub, obj in (("captions/cap.rc2.test1.json", entries),
                     ("image_splits/split.rc2.test1.json", {n: f"./test1/{n}.png" for n in names})):
        (root / "ann" / sub).parent.mkdir(parents=True, exist_ok=True)
        (root / "ann" / sub).write_text(json.dumps(obj))
    return root


def test_one_ray_pass_aligns_queries_and_gallery_across_actors(ray_session, shapes_root, tmp_path):
    """One pass over two benchmarks (shapes: bytes; a CIRR-format split: image files),
    two actors. image-only: each query's vector must be its reference's gallery vector
    (ids aligned, seeded random weights alike in both actors). The CIRR test1 split
    then gets its two server files from the model's rankings."""
    from cir.evaluation import (EncodeSettings, EvalConfig, EvalResult, config_dict, encode_benchmarks,
                                score_embeddings, write_outputs)

    root = fake_cirr(tmp_path)
    shapes = load_shapes("val", shapes_root)
    cirr = load_benchmark("cirr", "test1", root / "ann", root / "images")
    benches = [shapes, cirr]
    per_bench, info = encode_benchmarks(
        benches, "baseline:image-only", "cir-tiny",
        EncodeSettings(batch_size=16, num_actors=2, cpus_per_actor=0.5, rows_per_block=24))
    assert info["rows"] == sum(len(b.queries) + len(b.gallery_ids) for b in benches)
    for bench, (q, g) in zip(benches, per_bench):
        assert q.shape == (len(bench.queries), info["dim"]) and g.shape[0] == len(bench.gallery_ids)
        np.testing.assert_allclose(q, g[bench.reference_indices()], atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)
        assert not np.allclose(g[0], g[1])

    result = score_embeddings(cirr, *per_bench[1])
    assert result.metrics is None  # test1: no ground truth
    run = EvalResult("cirr", "test1", "model", "baseline:image-only", "cir-tiny", [result], None)
    files = write_outputs(run, {"cirr": cirr}, tmp_path / "out", config_dict(EvalConfig()))
    recall = json.loads(Path(files["submission_recall"]).read_text())
    subset = json.loads(Path(files["submission_recall_subset"]).read_text())
    assert recall["version"] == subset["version"] == "rc2"
    assert (recall["metric"], subset["metric"]) == ("recall", "recall_subset")
    for qr in cirr.queries:
        assert len(recall[qr.query_id]) == 13 and qr.ref_id not in recall[qr.query_id]
        assert len(subset[qr.query_id]) == 3 and qr.ref_id not in subset[qr.query_id]
        assert set(subset[qr.query_id]) <= set(qr.subset_ids)


def test_the_embedding_stage_reports_unreadable_images_and_composes_queries(tmp_path):
    import pyarrow as pa

    from cir.embed import Embedder
    from cir.evaluation import WORK_SCHEMA

    good = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (9, 9, 9)).save(good)
    embedder = Embedder("baseline:sum", "cir-tiny", threads=1)
    rows = [(0, "gallery", "a", None, str(good), None),
            (0, "gallery", "b", b"not an image", None, None),
            (0, "gallery", "c", None, str(tmp_path / "missing.png"), None),
            (0, "query", "q", good.read_bytes(), None, "make it red"),
            (0, "query", "r", None, None, "make it red")]  # sum needs the reference
    batch = pa.Table.from_pylist([dict(zip(WORK_SCHEMA.names, r)) for r in rows], schema=WORK_SCHEMA)
    out = embedder(batch).to_pydict()
    assert list(out) == ["part", "kind", "image_id", "embedding", "error"]  # the rest passes through
    errors = dict(zip(out["image_id"], out["error"]))
    assert errors["a"] is None and errors["q"] is None
    assert "not a readable image" in errors["b"]
    assert "missing.png" in errors["c"] and "neither" in errors["r"]
    assert out["embedding"][1] is None and len(out["embedding"][0]) == embedder.dim
    # gallery rows are images, rows with a text are (reference, text) queries
    image = decode_image(good.read_bytes())
    np.testing.assert_allclose(out["embedding"][0], embedder.model.encode_gallery([image])[0], atol=1e-6)
    np.testing.assert_allclose(out["embedding"][3], embedder.model.encode_queries([image], ["make it red"])[0],
                               atol=1e-6)
    assert not np.allclose(out["embedding"][0], out["embedding"][3])
    with pytest.raises(ValueError, match="embeds images only"):
        Embedder("cir-tiny", threads=1)(batch)


# ---- predictions mode on the real annotation files -------------------------------------------
@needs_shared
def test_circo_sample_submission_scores_the_official_numbers(tmp_path, capsys):
    circo = SHARED_BENCHMARKS / "circo"
    rc = run_job("--benchmark", "circo", "--split", "val", "--annotations", circo, "--predictions",
                 circo / "submission_examples" / "submission_val.json", "--output", tmp_path)
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    want = {"map@5": 0.4861, "map@10": 0.5178, "map@25": 0.5400, "map@50": 0.6020,
            "recall@5": 0.9091, "recall@10": 0.9091, "recall@25": 1.3636, "recall@50": 3.6364}
    assert {k: round(m[k], 4) for k in want} == want
    assert "0.4861" in capsys.readouterr().out


def _cirr_oracle(bench, target_rank: int = 0, with_reference: bool = False) -> dict:
    others = bench.gallery_ids
    preds = {}
    for q in bench.queries:
        rest = [i for i in others[:60] if i not in (q.ref_id, *q.target_ids)]
        lst = rest[:target_rank] + [q.target_ids[0]] + rest[target_rank:]
        preds[q.query_id] = ([q.ref_id] if with_reference else []) + lst[:50]
    return preds


@needs_shared
@pytest.mark.parametrize("target_rank,with_reference,recalls", [
    (0, False, (100, 100, 100, 100)),
    (0, True, (100, 100, 100, 100)),  # the protocol removes the reference first
    (6, False, (0, 0, 100, 100)),
])
def test_cirr_val_oracle_predictions(tmp_path, target_rank, with_reference, recalls):
    ann = SHARED_BENCHMARKS / "cirr"
    bench = load_benchmark("cirr", "val", ann)
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(_cirr_oracle(bench, target_rank, with_reference)))
    assert run_job("--benchmark", "cirr", "--split", "val", "--annotations", ann,
                   "--predictions", path, "--output", tmp_path / "out") == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert tuple(round(m[f"recall@{k}"]) for k in (1, 5, 10, 50)) == recalls
    if target_rank == 0:
        # The target is listed before every other member: Recall_subset is 100 too.
        assert m["recall_subset@1"] == m["avg"] == 100.0


@needs_shared
def test_cirr_val_server_format_files(tmp_path, capsys):
    """CIRR's server files (version/metric keys) are read as predictions; the subset
    file decides Recall_subset when given, and is refused in place of the recall file."""
    ann = SHARED_BENCHMARKS / "cirr"
    bench = load_benchmark("cirr", "val", ann)
    recall = {"version": "rc2", "metric": "recall", **_cirr_oracle(bench)}
    # Subset lists that put the target second: Recall_subset@1 = 0, @2 = 100.
    subset = {"version": "rc2", "metric": "recall_subset"}
    for q in bench.queries:
        others = [m for m in q.subset_ids if m not in (q.ref_id, q.target_ids[0])]
        subset[q.query_id] = [others[0], q.target_ids[0], *others[1:2]]
    (tmp_path / "r.json").write_text(json.dumps(recall))
    (tmp_path / "s.json").write_text(json.dumps(subset))
    assert run_job("--benchmark", "cirr", "--annotations", ann, "--predictions", tmp_path / "r.json",
                   "--subset-predictions", tmp_path / "s.json", "--output", tmp_path / "out") == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert (m["recall@1"], m["recall_subset@1"], m["recall_subset@2"]) == (100.0, 0.0, 100.0)
    assert run_job("--benchmark", "cirr", "--annotations", ann, "--predictions", tmp_path / "s.json",
                   "--output", tmp_path / "out2") == 2
    assert "--subset-predictions" in capsys.readouterr().err


@needs_shared
def test_predictions_the_official_code_would_refuse_are_refused_and_unofficial_numbers_are_named(tmp_path, capsys):
    """An image listed twice and a subset list naming a non-member stop the run with an
    error naming the query (nothing written); short lists and Recall_subset derived from
    top-50 lists are scored, with a warning that says what the number means."""
    ann = SHARED_BENCHMARKS / "cirr"
    bench = load_benchmark("cirr", "val", ann)
    good = _cirr_oracle(bench)
    q0, q1 = bench.queries[0], bench.queries[1]

    def run(preds, subset=None):
        path, out = tmp_path / "p.json", tmp_path / "out"
        path.write_text(json.dumps(preds))
        argv = ["--benchmark", "cirr", "--annotations", ann, "--predictions", path, "--output", out]
        if subset is not None:
            (tmp_path / "s.json").write_text(json.dumps(subset))
            argv += ["--subset-predictions", tmp_path / "s.json"]
        rc = run_job(*argv)
        return rc, capsys.readouterr().err, out

    twice = {**good, q1.query_id: good[q1.query_id][:3] + good[q1.query_id][:1] + good[q1.query_id][3:]}
    rc, err, out = run(twice)
    assert rc == 2 and f"query {q1.query_id} lists image {good[q1.query_id][0]!r} more than once" in err, err
    assert not out.exists()

    members = {q.query_id: [m for m in q.subset_ids if m != q.ref_id] for q in bench.queries}
    outsider = next(i for i in bench.gallery_ids if i not in q0.subset_ids)
    rc, err, out = run(good, {**members, q0.query_id: [outsider] + members[q0.query_id][:2]})
    assert rc == 2 and f"query {q0.query_id} lists {outsider!r}, not a member of its img_set" in err, err
    assert not out.exists()
    rc, err, _ = run(good, {**members, q0.query_id: members[q0.query_id][:1] * 2})
    assert rc == 2 and f"query {q0.query_id} lists image" in err and "more than once" in err, err

    # The full member lists are official Recall_subset: no warning at all.
    rc, err, out = run(good, members)
    assert rc == 0 and "warning" not in err, err
    assert json.loads((out / "metrics.json").read_text())["info"]["warnings"] == []

    short = {k: v[:10] for k, v in good.items()}
    rc, err, out = run(short, members)
    assert rc == 0, err
    warning = f"{len(bench.queries)} of {len(bench.queries)} cirr queries list fewer than 50 images"
    assert f"eval: warning: p.json: {warning}" in err and "lower bound" in err, err
    assert any(warning in w for w in json.loads((out / "metrics.json").read_text())["info"]["warnings"])

    rc, err, out = run(good)          # top-50 lists, no subset file: Recall_subset is not the official one
    doc = json.loads((out / "metrics.json").read_text())
    filled = doc["info"]["subset_from_ranking"]["queries_filled"]
    assert rc == 0 and 0 < filled <= len(bench.queries)
    assert f"for {filled} of {len(bench.queries)} queries a list does not hold every member" in err
    assert "not comparable with the official Recall_subset" in err


@needs_shared
def test_cirr_test1_predictions_become_a_valid_submission(tmp_path):
    ann = SHARED_BENCHMARKS / "cirr"
    bench = load_benchmark("cirr", "test1", ann)
    preds = {}
    expected_subset = {}
    for n, q in enumerate(bench.queries):
        members = [m for m in q.subset_ids if m != q.ref_id][::-1]
        fill = [i for i in bench.gallery_ids[:70] if i not in q.subset_ids]
        if n % 3 == 0:
            # Only one member in the (truncated) ranking: the others follow in img_set order.
            preds[q.query_id] = [members[0]] + fill
            expected_subset[q.query_id] = ([members[0]] + [m for m in q.subset_ids
                                                           if m not in (q.ref_id, members[0])])[:3]
        else:
            preds[q.query_id] = [q.ref_id] + members + fill  # a reference slipped in: dropped
            expected_subset[q.query_id] = members[:3]
    path = tmp_path / "test1.json"
    path.write_text(json.dumps(preds))
    out = tmp_path / "out"
    assert run_job("--benchmark", "cirr", "--split", "test1", "--annotations", ann,
                   "--predictions", path, "--output", out) == 0
    recall = json.loads((out / "submission_cirr_test1_recall.json").read_text())
    subset = json.loads((out / "submission_cirr_test1_recall_subset.json").read_text())
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    assert set(recall) == set(subset) == set(bench.query_ids) and len(recall) == 4148
    for q in bench.queries:
        r, s = recall[q.query_id], subset[q.query_id]
        assert len(r) == 50 == len(set(r)) and q.ref_id not in r
        assert len(s) == 3 and q.ref_id not in s and set(s) <= set(q.subset_ids)
        assert s == expected_subset[q.query_id]
        assert r == [i for i in preds[q.query_id] if i != q.ref_id][:50]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["metrics"] is None and doc["split"] == "test1"
    assert doc["info"]["subset_from_ranking"]["queries_filled"] == len(range(0, 4148, 3))


@needs_shared
def test_eval_writes_its_files_to_a_bucket(tmp_path, s3_uri):
    """--output at a URI: the same submission files as a local run, and metrics.json
    naming where they went."""
    from cir.storage import resolve

    ann = SHARED_BENCHMARKS / "cirr"
    bench = load_benchmark("cirr", "test1", ann)
    preds = {q.query_id: [i for i in bench.gallery_ids[:60] if i != q.ref_id] for q in bench.queries}
    path = tmp_path / "test1.json"
    path.write_text(json.dumps(preds))
    local, remote = tmp_path / "out", resolve(s3_uri)
    for out in (local, s3_uri):
        assert run_job("--benchmark", "cirr", "--split", "test1", "--annotations", ann,
                       "--predictions", path, "--output", out) == 0
    for name in ("submission_cirr_test1_recall.json", "submission_cirr_test1_recall_subset.json"):
        assert (remote / name).read_bytes() == (local / name).read_bytes()
    doc = json.loads((remote / "metrics.json").read_text())
    assert doc["files"]["submission_recall"] == str(remote / "submission_cirr_test1_recall.json")


@needs_shared
def test_fashioniq_predictions_give_three_categories_and_the_mean(tmp_path, capsys):
    from cir.benchmarks import load_fashioniq_all

    ann = SHARED_BENCHMARKS / "fashioniq"
    preds = {}
    for bench in load_fashioniq_all("val", ann).values():
        for i, q in enumerate(bench.queries):
            wrong = [g for g in bench.gallery_ids[:60] if g != q.target_ids[0]][:50]
            # dress: always right; shirt: right at rank 20 for even queries; toptee: never.
            if bench.name.endswith("dress"):
                preds[q.query_id] = [q.target_ids[0]] + wrong[:49]
            elif bench.name.endswith("shirt") and i % 2 == 0:
                preds[q.query_id] = wrong[:19] + [q.target_ids[0]] + wrong[19:49]
            else:
                preds[q.query_id] = wrong
    path = tmp_path / "fiq.json"
    path.write_text(json.dumps(preds))
    assert run_job("--benchmark", "fashioniq", "--annotations", ann, "--predictions", path,
                   "--output", tmp_path / "out") == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    shirt_half = 100 * ((2038 + 1) // 2) / 2038
    assert m["dress/recall@10"] == 100 and m["toptee/recall@50"] == 0
    assert m["shirt/recall@10"] == 0 and m["shirt/recall@50"] == pytest.approx(shirt_half)
    assert m["recall@50"] == pytest.approx((100 + shirt_half + 0) / 3)
    assert "mean" in capsys.readouterr().out


# ---- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--benchmark", "imagenet"], "unknown benchmark 'imagenet'"),
    (["--benchmark", "shapes", "--split", "dev"], "unknown split 'dev'"),
    (["--benchmark", "shapes", "--model", "baseline:avg"], "unknown baseline 'avg'"),
    (["--benchmark", "shapes", "--model", "clip"], "unknown model spec 'clip'"),
    (["--benchmark", "shapes", "--encoder", "no-such-clip"], "unknown encoder model"),
    (["--benchmark", "cirr", "--split", "val"], "needs --annotations"),
    (["--set", "encode.batch_size=0"], "batch_size"),
    (["--set", "nonsense=1"], "unknown key"),
])
def test_job_errors_name_the_problem(shapes_root, argv, message, capsys):
    if argv[:2] == ["--benchmark", "shapes"]:
        argv = argv + ["--data", str(shapes_root)]
    assert run_job(*argv) == 2
    assert "eval: error:" in (err := capsys.readouterr().err) and message in err, err


@needs_shared
def test_job_errors_on_files(tmp_path, capsys):
    # A missing annotation file is named.
    (tmp_path / "empty").mkdir()
    assert run_job("--benchmark", "cirr", "--annotations", tmp_path / "empty", "--predictions",
                   tmp_path / "x.json") == 2
    assert "cap.rc2.val.json" in capsys.readouterr().err
    # A model run on a real benchmark needs its images; missing images are named.
    ann = SHARED_BENCHMARKS / "cirr"
    assert run_job("--benchmark", "cirr", "--annotations", ann) == 2
    assert "--images" in capsys.readouterr().err
    assert run_job("--benchmark", "cirr", "--annotations", ann, "--images", tmp_path / "empty") == 2
    assert "not found; tried" in (err := capsys.readouterr().err) and str(tmp_path / "empty") in err
    # A predictions file that misses queries.
    circo = SHARED_BENCHMARKS / "circo"
    sample = json.loads((circo / "submission_examples" / "submission_val.json").read_text())
    sample.pop(next(iter(sample)))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(sample))
    assert run_job("--benchmark", "circo", "--annotations", circo, "--predictions", partial,
                   "--output", tmp_path / "o") == 2
    assert "1 of 220 queries missing" in capsys.readouterr().err
    assert run_job("--benchmark", "circo", "--annotations", circo, "--predictions",
                   tmp_path / "nope.json") == 2
    assert "predictions file not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["shapes", "cirr", "fashioniq", "circo"])
def test_example_configs_load(name, capsys):
    args = JOB.parse_args(["--config", str(REPO / "configs" / "eval" / f"{name}.yaml")])
    cfg = JOB.build_config(args)
    assert cfg.benchmark == name and cfg.model.startswith("baseline:")
    cfg.validate()
    if name != "shapes":  # the folders a user must fill are left empty: a clear error
        assert cfg.annotations is None and cfg.images is None
        assert run_job("--config", REPO / "configs" / "eval" / f"{name}.yaml") == 2
        assert "--annotations" in capsys.readouterr().err
