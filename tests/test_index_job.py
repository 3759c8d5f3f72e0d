"""The index job on a small shapes gallery: stages, manifest, search, resume, shard
partitioning, bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cir.embed import read_embeddings
from cir.index.build import IndexParams, check_encoder, read_manifest
from cir.index.job import IndexJobConfig, IndexRun
from cir.index.search import ShardedIndex
from cir.outputs import read_table


def test_index_job_writes_a_searchable_sharded_index(shapes_index):
    cfg, results = shapes_index
    folder = f"{cfg.output}/index"
    manifest = read_manifest(folder)
    assert manifest["rows"] == 60 and len(manifest["shards"]) == 2 and results["index"]["shard_rows"] == \
        [s["rows"] for s in manifest["shards"]]
    check_encoder(manifest, "cir-shapes", 128)
    ids, vectors, _ = read_embeddings(f"{cfg.output}/embeddings")
    found = ShardedIndex.load(folder).search(vectors[:10], 5)
    for image_id, vector, (scores, top) in zip(ids[:10], vectors[:10], found):
        assert scores[0] == pytest.approx(1.0, abs=1e-5)
        assert image_id in top[scores >= scores[0] - 1e-6]     # itself, or an identical image


def test_gallery_table_has_metadata_and_thumbnails(shapes_index):
    from PIL import Image
    import io

    cfg, _ = shapes_index
    gallery = read_table(f"{cfg.output}/gallery")
    assert gallery.num_rows == 60 and gallery.column("caption").null_count == 0
    thumb = Image.open(io.BytesIO(gallery.column("thumbnail")[0].as_py()))
    assert thumb.format == "JPEG" and max(thumb.size) <= cfg.thumbnail_size


def test_rerun_resumes_and_changed_settings_are_refused(shapes_index):
    from cir.outputs import StageConfigMismatch

    cfg, _ = shapes_index
    again = IndexRun(cfg).run()
    assert all(r["skipped"] for r in again.values())
    with pytest.raises(StageConfigMismatch):
        IndexRun(IndexJobConfig(gallery=cfg.gallery, output=cfg.output, shards=3)).run()


def test_bad_galleries_and_settings_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError):
        IndexRun(IndexJobConfig(gallery=str(tmp_path / "missing"), output=str(tmp_path / "out")))
    empty = tmp_path / "empty.parquet"
    pq.write_table(read_table_stub(), empty)
    with pytest.raises(ValueError, match="empty"):
        IndexRun(IndexJobConfig(gallery=str(empty), output=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="shards"):
        IndexRun(IndexJobConfig(gallery=str(empty), shards=0))
    with pytest.raises(ValueError, match="unknown encoder"):
        IndexRun(IndexJobConfig(gallery=str(empty), encoder="ViT-Nope"))
    assert not (tmp_path / "out").exists()


def read_table_stub():
    import pyarrow as pa

    return pa.table({"image_id": pa.array([], pa.string()), "image": pa.array([], pa.binary())})


def test_the_job_scripts_flags_reach_the_config(shapes_index):
    from conftest import load_job

    job = load_job("index")
    cfg = job.build_config(job.parse_args(["--gallery", shapes_index[0].gallery, "--shards", "3",
                                           "--set", "index.kind=flat"]))
    assert (cfg.shards, cfg.index.kind, cfg.encoder) == (3, "flat", "cir-shapes")


def test_each_shard_task_reads_only_its_partition(shapes_index, tmp_path):
    from cir.index.build import shard_of
    from cir.index.job import partition_by_shard, rows_in
    from cir.outputs import parquet_files

    cfg, _ = shapes_index
    manifest = read_manifest(f"{cfg.output}/index")
    parts = partition_by_shard([str(f) for f in parquet_files(Path(cfg.output, "embeddings"))], 2, tmp_path / "p")
    assert [rows_in(files) for files in parts] == [s["rows"] for s in manifest["shards"]]
    for shard, files in enumerate(parts):
        ids = pa.concat_tables([pq.read_table(f) for f in files]).column("image_id").to_pylist()
        assert set(shard_of(ids, 2).tolist()) == {shard}
    # The stage's scratch partitions are gone: the index folder holds the shards and manifest only.
    assert sorted(p.name for p in Path(cfg.output, "index").iterdir()) == sorted(
        ["manifest.json", "_SUCCESS.json"] + [f for s in manifest["shards"] for f in (s["index"], s["ids"])])


def test_empty_shards_and_a_too_small_budget_are_refused_before_any_shard_is_built(shapes_index, tmp_path):
    cfg, _ = shapes_index
    out = tmp_path / "out"
    shutil.copytree(Path(cfg.output, "embeddings"), out / "embeddings")       # reused, not recomputed
    too_small = r"of dim 128 needs at least [\d.]+ MiB \(Flat\), over index.memory_budget_mb=0.01"
    for index, error in [({"shards": 64}, "empty: use fewer shards"),
                         ({"index": IndexParams(memory_budget_mb=0.01)}, too_small)]:
        with pytest.raises(ValueError, match=error):
            IndexRun(IndexJobConfig(gallery=cfg.gallery, output=str(out), **index)).run()
        assert sorted(p.name for p in out.iterdir()) == ["embeddings"]        # nothing half-written left


def _search_copy(src, local: Path, vectors):
    """Copy an index job's output down (what a server needs first) and search it: the
    manifest's checksums are checked by ShardedIndex.load; serving's settings take it."""
    from cir.outputs import copy_output
    from serve.settings import ServeSettings

    copy_output(src, local, ["index", "gallery"])
    index, gallery = ServeSettings(index=str(local)).folders()
    assert read_table(gallery).num_rows == 60
    return ShardedIndex.load(index).search(vectors, 5)


def test_index_job_on_a_filesystem_that_is_not_the_local_disk(shapes_index, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from cir.outputs import SUCCESS
    from cir.storage import resolve

    cfg, results = shapes_index
    monkeypatch.chdir(tmp_path)
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    remote = IndexJobConfig(gallery=cfg.gallery, output="runs/index", shards=2)
    got = IndexRun(remote, filesystem=fs).run()
    assert not (tmp_path / "runs").exists(), "a stage wrote to the local disk"
    assert [got[s]["rows"] for s in ("embeddings", "index", "gallery")] == \
        [results[s]["rows"] for s in ("embeddings", "index", "gallery")]
    assert got["index"]["shard_rows"] == results["index"]["shard_rows"]
    root = resolve("runs/index", filesystem=fs)
    import json

    attempt = json.loads((root / "index" / SUCCESS).read_text())["files"][0].split("/")[0]
    assert attempt.startswith("attempt-") and not (root / "index" / attempt / "_by_shard").exists()
    ids, vectors, _ = read_embeddings(f"{cfg.output}/embeddings")
    for (scores, top), image_id in zip(_search_copy(root, tmp_path / "copy", vectors[:10]), ids[:10]):
        assert scores[0] == pytest.approx(1.0, abs=1e-5) and image_id in top[scores >= scores[0] - 1e-6]
    assert all(r["skipped"] for r in IndexRun(remote, filesystem=fs).run().values())


def test_index_job_on_s3_from_a_gallery_on_s3(s3_uri, shapes_index, tmp_path, monkeypatch):
    """The index job reads its gallery from a bucket and writes there; serving's settings
    take the bucket's URI and search a local copy made once (this node's cache)."""
    import pyarrow.fs as pafs

    from conftest import uri_child
    from cir.storage import resolve
    from serve.settings import ServeSettings

    uri = s3_uri
    cfg, results = shapes_index
    gallery = resolve(uri_child(uri, "gallery"))
    gallery.mkdir()
    pafs.copy_files(cfg.gallery, gallery.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=gallery.fs)
    remote = IndexJobConfig(gallery=uri_child(uri, "gallery"), output=uri_child(uri, "out"), shards=2)
    got = IndexRun(remote).run()
    assert got["index"]["shard_rows"] == results["index"]["shard_rows"]
    ids, vectors, _ = read_embeddings(f"{cfg.output}/embeddings")
    (scores, top), = _search_copy(remote.output, tmp_path / "copy", vectors[:1])
    assert top[0] == ids[0] or scores[0] == pytest.approx(scores[1])

    monkeypatch.setenv("CIR_CACHE_DIR", str(tmp_path / "cache"))
    index, gallery = ServeSettings(index=remote.output).folders()
    assert index.parent.parent == tmp_path / "cache" / "outputs"
    assert ServeSettings(index=remote.output).folders() == (index, gallery)     # one copy a node
    assert read_table(gallery).num_rows == 60
    (served_scores, served_top), = ShardedIndex.load(index).search(vectors[:1], 5)
    assert list(served_top) == list(top) and np.allclose(served_scores, scores)
