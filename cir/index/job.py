"""The index job (`jobs/index.py`): a gallery -> embeddings -> a sharded index, plus the
gallery's metadata and thumbnails for the results and the web page.

Stages, each a table folder under the output, committed like the synth job's
(`cir.outputs.OutputDir`: a rerun skips finished stages, refuses changed ones):

    embeddings  the one Ray Data embedding stage (`cir.embed`), through the encoder's
                gallery side (an open_clip name, or a query-encoder spec)
    index       one Ray task per shard: reads the embeddings, keeps its rows (a hash of
                the id picks the shard, `build.shard_of`), writes its FAISS and ids files;
                the driver writes the manifest (`cir.index.build`)
    gallery     image_id, caption, category and a JPEG thumbnail per image (Ray Data)
"""
from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cir.data import corpus as corpus_io
from cir.embed import EmbedSettings
from cir.index.build import MANIFEST, IndexParams, index_manifest, shard_rows, write_shard
from cir.outputs import OutputDir, parquet_files, write_json_atomic
from cir.progress import log

THUMBNAIL_SCHEMA = pa.schema([("image_id", pa.string()), ("caption", pa.string()), ("category", pa.string()),
                              ("thumbnail", pa.binary())])


@dataclass
class IndexJobConfig:
    # A synth output (its corpus/), a Parquet corpus, or an image folder.
    gallery: str = "outputs/synth-local"
    # An open_clip name (cir-shapes) or a query-encoder spec (checkpoint:PATH, baseline:...).
    encoder: str = "cir-shapes"
    image_encoder: str | None = None      # the image tower of a baseline:... spec
    output: str = "outputs/index-local"
    shards: int = 2
    index: IndexParams = field(default_factory=IndexParams)
    encode: EmbedSettings = field(default_factory=EmbedSettings)
    thumbnail_size: int = 128
    rows_per_file: int = 50_000

    def validate(self) -> None:
        from cir.query_encoders import check_query_spec, is_query_spec

        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if not 16 <= self.thumbnail_size <= 1024:
            raise ValueError(f"thumbnail_size must be in 16..1024, got {self.thumbnail_size}")
        self.index.validate()
        self.encode.validate("encode")
        if is_query_spec(self.encoder):
            check_query_spec(self.encoder, self.image_encoder)
        else:
            from cir.encoders import validate_encoder_name

            validate_encoder_name(self.encoder)


def gallery_source(gallery: str) -> tuple[str, list[str] | pa.Table]:
    """('parquet', files) or ('folder', table of paths) for a gallery argument."""
    path = Path(gallery).expanduser()
    if (path / "corpus" / "_SUCCESS.json").is_file():      # a synth output
        path = path / "corpus"
    if str(gallery) == "shapes":
        raise ValueError("the index job needs images: give a synth output, a Parquet corpus or an image folder")
    kind = corpus_io.corpus_kind(str(path))
    if kind == "parquet":
        files = corpus_io.parquet_corpus_files(path)
        corpus_io.check_parquet_corpus(files, needs_captions=False)
        return "parquet", files
    return "folder", corpus_io.scan_image_folder(path)


def build_shard_from_embeddings(files: list[str], shard: int, n_shards: int, folder: str, params: dict) -> dict:
    """A Ray task: the rows of `shard` from the embeddings table, indexed into `folder`."""
    from cir.schemas import embedding_matrix

    table = pa.concat_tables([pq.read_table(f, columns=["image_id", "embedding"]) for f in files])
    table = table.filter(pa.compute.is_valid(table.column("embedding")))
    ids = table.column("image_id").to_pylist()
    rows = shard_rows(ids, n_shards)[shard]
    vectors = embedding_matrix(table.column("embedding").take(pa.array(rows)))
    return write_shard(Path(folder), shard, [ids[i] for i in rows], vectors, IndexParams(**params))


class Thumbnailer:
    """`map_batches` callable: image_id, caption, category and a JPEG thumbnail per row
    (null where the image cannot be read)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cir.embed import read_image

        def column(name):
            return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows

        thumbs = []
        for data, path in zip(column("image"), column("path")):
            try:
                image = read_image(data, path)
            except ValueError:
                thumbs.append(None)
                continue
            image.thumbnail((self.size, self.size))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=85)
            thumbs.append(out.getvalue())
        return pa.table({"image_id": column("image_id"), "caption": column("caption"),
                         "category": column("category"), "thumbnail": thumbs}, schema=THUMBNAIL_SCHEMA)


class IndexRun:
    def __init__(self, cfg: IndexJobConfig):
        cfg.validate()
        self.cfg = cfg
        self.kind, self.source = gallery_source(cfg.gallery)   # bad galleries fail before Ray starts
        self.out = OutputDir(cfg.output)

    def images(self):
        import ray

        from cir.raycluster import dataset_from_table

        if self.kind == "parquet":
            names = pq.read_schema(self.source[0]).names
            keep = [c for c in ("image_id", "image", "path", "caption", "category") if c in names]
            return ray.data.read_parquet(self.source).select_columns(keep)
        return dataset_from_table(self.source, self.cfg.encode.batch_size * 4)

    def _source_fingerprint(self) -> dict:
        return {"gallery": str(Path(self.cfg.gallery).expanduser().resolve()), "kind": self.kind}

    def run(self) -> dict:
        self.out.clean_stale()
        results = {}
        for name, fingerprint, work in [
            ("embeddings", {"encoder": self.cfg.encoder, "image_encoder": self.cfg.image_encoder,
                            **self._source_fingerprint()}, self._embeddings),
            ("index", {"shards": self.cfg.shards, "params": asdict(self.cfg.index), "encoder": self.cfg.encoder,
                       **self._source_fingerprint()}, self._index),
            ("gallery", {"thumbnail_size": self.cfg.thumbnail_size, **self._source_fingerprint()}, self._gallery),
        ]:
            results[name] = self._run_stage(name, fingerprint, work)
        return results

    def _run_stage(self, name: str, fingerprint: dict, work) -> dict:
        if self.out.done(name):
            self.out.check_fingerprint(name, fingerprint)
            log(f"{name}: already done in {self.out.path(name)}, skipping")
            return {**self.out.manifest(name), "skipped": True}
        log(f"{name}: starting")
        t0 = time.perf_counter()
        with self.out.stage(name, fingerprint) as (tmp, manifest):
            manifest.update(work(tmp) or {})
            manifest["seconds"] = round(time.perf_counter() - t0, 3)
        log(f"{name}: done in {time.perf_counter() - t0:.1f}s -> {self.out.path(name)}")
        return {**self.out.manifest(name), "skipped": False}

    def _embeddings(self, tmp: Path) -> dict:
        from cir.embed import embed, write_embeddings

        ds = self.images().select_columns([c for c in ("image_id", "image", "path")
                                           if c in self._columns()])
        report = write_embeddings(embed(ds, self.cfg.encoder, self.cfg.encode, self.cfg.image_encoder), tmp,
                                  self.cfg.encoder, self.cfg.rows_per_file)
        if report.rows == 0:
            raise ValueError(f"no image of the gallery {self.cfg.gallery} could be read ({len(report.bad)} failed)")
        return {"rows": report.rows, "dim": report.dim, "bad_images": report.bad}

    def _columns(self) -> list[str]:
        return pq.read_schema(self.source[0]).names if self.kind == "parquet" else self.source.column_names

    def _index(self, tmp: Path) -> dict:
        import ray

        files = [str(f) for f in parquet_files(self.out.path("embeddings"))]
        dim = self.out.manifest("embeddings")["dim"]
        task = ray.remote(num_cpus=1)(build_shard_from_embeddings)
        shards = ray.get([task.remote(files, i, self.cfg.shards, str(tmp), asdict(self.cfg.index))
                          for i in range(self.cfg.shards)])
        manifest = index_manifest(self.cfg.encoder, dim, self.cfg.index, shards)
        write_json_atomic(tmp / MANIFEST, manifest)
        return {"rows": manifest["rows"], "shard_rows": [s["rows"] for s in shards]}

    def _gallery(self, tmp: Path) -> dict:
        import ray

        self.images().map_batches(Thumbnailer, fn_constructor_args=(self.cfg.thumbnail_size,),
                                  batch_size=256, batch_format="pyarrow",
                                  compute=ray.data.ActorPoolStrategy(size=1)).write_parquet(
            str(tmp), schema=THUMBNAIL_SCHEMA)
        return {"rows": sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(tmp))}
