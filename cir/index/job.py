"""The index job (`jobs/index.py`): a gallery -> embeddings -> a sharded index, plus the
gallery's metadata and thumbnails for the results and the web page.

Stages, each a table folder under the output, committed like the synth job's
(`cir.outputs.OutputDir`: a rerun skips finished stages, refuses changed ones):

    embeddings  the one Ray Data embedding stage (`cir.embed`), through the encoder's
                gallery side (an open_clip name, or a query-encoder spec)
    index       Ray Data splits the embeddings by shard (a hash of the id,
                `build.shard_of`) into a scratch folder; the driver plans the index from
                the shard sizes and the memory budget (`build.plan_index`); one Ray task
                trains it on a sample (on a GPU where there is one), then one task per
                shard reads its own rows only and writes its FAISS and ids files; the
                driver writes the manifest (`cir.index.build`)
    gallery     image_id, caption, category and a JPEG thumbnail per image (Ray Data)

The output may be a URI (`s3://`, `gs://`) or a path on a given pyarrow filesystem
(`cir.storage`), as may a gallery that is a synth output or a Parquet corpus: each
shard task writes its FAISS files locally and uploads them into the stage's attempt
folder, which the stage's marker commits. Serving maps index files from a local disk.
"""
from __future__ import annotations

import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir.data import corpus as corpus_io
from cir.embed import EmbedSettings
from cir.index.build import (MANIFEST, IndexParams, IndexPlan, check_shard_sizes, index_manifest, plan_index,
                             shard_of, train_index, write_shard)
from cir.outputs import SUCCESS, OutputDir, parquet_file, parquet_files, write_json_atomic
from cir.storage import Location, ray_read_parquet, refs, remove_tree, resolve, split, upload, walk_files

GALLERY_SCHEMA = pa.schema([("image_id", pa.string()), ("caption", pa.string()), ("category", pa.string()),
                            ("thumbnail", pa.binary()), ("reference", pa.binary())])
# Small row groups: a server reads one group to answer one thumbnail (cir.index.gallery).
GALLERY_ROW_GROUP = 256


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
    # The copy of each image that an `image_id` query encodes: PNG (lossless, so a gallery
    # image queried by id encodes as it was indexed), shrunk to this longest side when
    # larger (an encoder's input is ~224 px). 0: keep none (queries must upload).
    reference_size: int = 224
    rows_per_file: int = 50_000

    def validate(self) -> None:
        from cir.query_encoders import check_query_spec, is_query_spec

        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if not 16 <= self.thumbnail_size <= 1024:
            raise ValueError(f"thumbnail_size must be in 16..1024, got {self.thumbnail_size}")
        if self.reference_size and not 16 <= self.reference_size <= 2048:
            raise ValueError(f"reference_size must be 0 or in 16..2048, got {self.reference_size}")
        self.index.validate()
        self.encode.validate("encode")
        if is_query_spec(self.encoder):
            check_query_spec(self.encoder, self.image_encoder)
        else:
            from cir.encoders import validate_encoder_name

            validate_encoder_name(self.encoder)


def gallery_source(gallery: str) -> tuple[str, list | pa.Table]:
    """('parquet', files) or ('folder', table of paths) for a gallery argument."""
    if str(gallery) == "shapes":
        raise ValueError("the index job needs images: give a synth output, a Parquet corpus or an image folder")
    where = resolve(gallery) if "://" in str(gallery) else Path(gallery).expanduser()
    if isinstance(where, Location):
        # On an object store: a synth output or a Parquet corpus (image folders are local).
        if (where / "corpus" / SUCCESS).is_file():
            where = where / "corpus"
        files = corpus_io.parquet_corpus_files(where)
        corpus_io.check_parquet_corpus(files, needs_captions=False)
        return "parquet", files
    path = where
    if (path / "corpus" / "_SUCCESS.json").is_file():      # a synth output
        path = path / "corpus"
    kind = corpus_io.corpus_kind(str(path))
    if kind == "parquet":
        files = corpus_io.parquet_corpus_files(path)
        corpus_io.check_parquet_corpus(files, needs_captions=False)
        return "parquet", files
    return "folder", corpus_io.scan_image_folder(path)


def partition_by_shard(files: list, n_shards: int, folder) -> list[list]:
    """The embeddings rows split by shard into `folder` (Ray Data: a shard column from
    `shard_of`, then write_parquet partitioned on it, which names Hive-style folders
    `shard=<i>`), so that each shard's task reads its own rows only; rows without an
    embedding are dropped. Returns each shard's files ([] for an empty shard)."""
    import pyarrow.compute as pc
    import ray

    def with_shard(batch: pa.Table) -> pa.Table:
        batch = batch.filter(pc.is_valid(batch.column("embedding")))
        return batch.append_column("shard", pa.array(shard_of(batch.column("image_id").to_pylist(), n_shards)))

    fs, path = split(folder)
    ray_read_parquet(files).select_columns(["image_id", "embedding"]).map_batches(
        with_shard, batch_format="pyarrow").write_parquet(path, filesystem=fs, partition_cols=["shard"])
    return [refs(f for f in walk_files(folder / f"shard={i}") if f.name.endswith(".parquet"))
            for i in range(n_shards)]


def rows_in(files: list) -> int:
    return sum(parquet_file(f).metadata.num_rows for f in files)


def _read(f, columns: list[str]) -> pa.Table:
    fs, path = split(f)
    return pq.read_table(path, columns=columns, filesystem=fs)


def train_from_files(files: list[str], plan: IndexPlan, dim: int, gpu, seed: int = 0) -> np.ndarray:
    """A Ray task: `build.train_index` on about `plan.train_rows` rows drawn at random
    from `files`, read one file at a time so that only the sample is held."""
    from cir.schemas import embedding_matrix

    sample = None
    if plan.train_rows:
        fraction = min(1.0, plan.train_rows / rows_in(files))
        parts = []
        for i, f in enumerate(files):
            vectors = embedding_matrix(_read(f, ["embedding"]).column("embedding"))
            parts.append(vectors[np.random.default_rng([seed, i]).random(len(vectors)) < fraction])
        sample = np.concatenate(parts)
    return train_index(plan, dim, sample, gpu)


def build_shard_from_partition(files: list, shard: int, folder: str | Location, params: IndexParams,
                               plan: IndexPlan, trained: np.ndarray) -> dict:
    """A Ray task: one shard's rows (its partition's files) indexed into `folder`; on an
    object store FAISS writes into a local temp folder and the files are uploaded."""
    from cir.schemas import embedding_matrix

    table = pa.concat_tables([_read(f, ["image_id", "embedding"]) for f in files])
    ids, vectors = table.column("image_id").to_pylist(), embedding_matrix(table.column("embedding"))
    if not isinstance(folder, Location):
        return write_shard(Path(folder), shard, ids, vectors, params, plan, trained)
    with tempfile.TemporaryDirectory(prefix="cir-shard-") as local:
        entry = write_shard(Path(local), shard, ids, vectors, params, plan, trained)
        for name in (entry["index"], entry["ids"]):
            upload(Path(local) / name, folder / name)
    return entry


class Thumbnailer:
    """`map_batches` callable: image_id, caption, category, a JPEG thumbnail and the PNG
    reference copy per row (nulls where the image cannot be read)."""

    def __init__(self, size: int, reference_size: int):
        self.size, self.reference_size = size, reference_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cir.embed import read_image

        def column(name):
            return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows

        thumbs, refs = [], []
        for data, path in zip(column("image"), column("path")):
            try:
                image = read_image(data, path)
            except ValueError:
                thumbs.append(None)
                refs.append(None)
                continue
            refs.append(self._encode(image, self.reference_size, "PNG") if self.reference_size else None)
            thumbs.append(self._encode(image, self.size, "JPEG", quality=85))
        return pa.table({"image_id": column("image_id"), "caption": column("caption"),
                         "category": column("category"), "thumbnail": thumbs, "reference": refs},
                        schema=GALLERY_SCHEMA)

    @staticmethod
    def _encode(image, side: int, fmt: str, **kwargs) -> bytes:
        if max(image.size) > side:
            image = image.copy()
            image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, format=fmt, **kwargs)
        return out.getvalue()


class IndexRun:
    def __init__(self, cfg: IndexJobConfig, filesystem=None):
        """`filesystem`: a pyarrow FileSystem that `cfg.output` is a path on (else a path or URI)."""
        cfg.validate()
        self.cfg = cfg
        self.kind, self.source = gallery_source(cfg.gallery)   # bad galleries fail before Ray starts
        self.out = OutputDir(cfg.output, filesystem)

    def images(self):
        import ray

        from cir.raycluster import dataset_from_table

        if self.kind == "parquet":
            names = self._columns()
            keep = [c for c in ("image_id", "image", "path", "caption", "category") if c in names]
            return ray_read_parquet(self.source).select_columns(keep)
        return dataset_from_table(self.source, self.cfg.encode.batch_size * 4)

    def _source_fingerprint(self) -> dict:
        return {"gallery": str(resolve(self.cfg.gallery)), "kind": self.kind}

    def run(self) -> dict:
        self.out.clean_stale()
        results = {}
        for name, fingerprint, work in [
            ("embeddings", {"encoder": self.cfg.encoder, "image_encoder": self.cfg.image_encoder,
                            **self._source_fingerprint()}, self._embeddings),
            ("index", {"shards": self.cfg.shards, "params": asdict(self.cfg.index), "encoder": self.cfg.encoder,
                       **self._source_fingerprint()}, self._index),
            ("gallery", {"thumbnail_size": self.cfg.thumbnail_size, "reference_size": self.cfg.reference_size,
                         **self._source_fingerprint()}, self._gallery),
        ]:
            results[name] = self._run_stage(name, fingerprint, work)
        return results

    def _run_stage(self, name: str, fingerprint: dict, work) -> dict:
        manifest, skipped = self.out.run_stage(name, fingerprint, work)
        return {**manifest, "skipped": skipped}

    def _embeddings(self, tmp) -> dict:
        from cir.embed import embed, write_embeddings

        ds = self.images().select_columns([c for c in ("image_id", "image", "path")
                                           if c in self._columns()])
        report = write_embeddings(embed(ds, self.cfg.encoder, self.cfg.encode, self.cfg.image_encoder), tmp,
                                  self.cfg.encoder, self.cfg.rows_per_file)
        if report.rows == 0:
            raise ValueError(f"no image of the gallery {self.cfg.gallery} could be read ({len(report.bad)} failed)")
        return {"rows": report.rows, "dim": report.dim, "bad_images": report.bad}

    def _columns(self) -> list[str]:
        return parquet_file(self.source[0]).schema_arrow.names if self.kind == "parquet" else self.source.column_names

    def _index(self, tmp) -> dict:
        import ray

        params, dim = self.cfg.index, self.out.manifest("embeddings")["dim"]
        scratch = tmp / "_by_shard"         # inside the stage's temp folder: gone if the stage fails
        parts = partition_by_shard(refs(parquet_files(self.out.path("embeddings"))), self.cfg.shards, scratch)
        sizes = [rows_in(p) for p in parts]
        check_shard_sizes(sizes)
        plan = plan_index(params, max(sizes), dim)      # a budget too small is refused here, before any work
        # Ray hides GPUs from a task that asks for none; given one, FAISS decides (build.use_gpu).
        gpus = 1 if params.gpu is not False and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        trained = ray.remote(num_cpus=1, num_gpus=gpus)(train_from_files).remote(
            [f for p in parts for f in p], plan, dim, params.gpu)     # each shard task waits for it
        task = ray.remote(num_cpus=1)(build_shard_from_partition)
        target = tmp if isinstance(tmp, Location) else str(tmp)
        shards = ray.get([task.remote(p, i, target, params, plan, trained) for i, p in enumerate(parts)])
        remove_tree(scratch)                # the index folder holds the shards and the manifest only
        manifest = index_manifest(self.cfg.encoder, dim, params, shards, self.cfg.image_encoder)
        write_json_atomic(tmp / MANIFEST, manifest)
        return {"rows": manifest["rows"], "shard_rows": [s["rows"] for s in shards], "factory": plan.factory}

    def _gallery(self, tmp) -> dict:
        from cir.actor_pool import actor_pool

        fs, path = split(tmp)
        self.images().map_batches(Thumbnailer, fn_constructor_args=(self.cfg.thumbnail_size, self.cfg.reference_size),
                                  batch_size=GALLERY_ROW_GROUP, batch_format="pyarrow", **actor_pool(1)).write_parquet(
            path, filesystem=fs, schema=GALLERY_SCHEMA, row_group_size=GALLERY_ROW_GROUP)
        return {"rows": rows_in(parquet_files(tmp))}
