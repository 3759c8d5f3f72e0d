"""The index job on a small shapes gallery: stages, manifest, search, resume, bad input."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from cir.embed import read_embeddings
from cir.index.build import check_encoder, read_manifest
from cir.index.job import IndexJobConfig, IndexRun
from cir.index.search import ShardedIndex
from cir.outputs import read_table


@pytest.fixture(scope="module")
def index_run(ray_session, tmp_path_factory):
    from cir.data.shapes_corpus import write_corpus

    root = tmp_path_factory.mktemp("index-job")
    corpus = write_corpus(root / "corpus", 60, seed=7, image_size=64)
    cfg = IndexJobConfig(gallery=str(corpus), output=str(root / "out"), shards=2)
    return cfg, IndexRun(cfg).run()


def test_index_job_writes_a_searchable_sharded_index(index_run):
    cfg, results = index_run
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


def test_gallery_table_has_metadata_and_thumbnails(index_run):
    from PIL import Image
    import io

    cfg, _ = index_run
    gallery = read_table(f"{cfg.output}/gallery")
    assert gallery.num_rows == 60 and gallery.column("caption").null_count == 0
    thumb = Image.open(io.BytesIO(gallery.column("thumbnail")[0].as_py()))
    assert thumb.format == "JPEG" and max(thumb.size) <= cfg.thumbnail_size


def test_rerun_resumes_and_changed_settings_are_refused(index_run):
    from cir.outputs import StageConfigMismatch

    cfg, _ = index_run
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


def test_the_job_scripts_flags_reach_the_config(index_run):
    from conftest import load_job

    job = load_job("index")
    cfg = job.build_config(job.parse_args(["--gallery", index_run[0].gallery, "--shards", "3",
                                           "--set", "index.kind=flat"]))
    assert (cfg.shards, cfg.index.kind, cfg.encoder) == (3, "flat", "cir-shapes")
