"""The one Ray Data stage that turns images into embeddings.

The synth job (its `embeddings` table), evaluation (gallery and queries in one pass),
training (the frozen vision tower's feature cache) and the index job all encode here:

    in:  image_id, image (encoded bytes) | path [, text]     (other columns pass through)
    out: image_id, embedding (fixed_size_list<float32>[d], null if unreadable), error

`encoder` is an open_clip encoder name (`cir-shapes`, `ViT-L-14/openai`), whose image
tower embeds every row; or a query-encoder spec (`baseline:sum` with `image_encoder=`,
`checkpoint:PATH`), whose gallery side embeds the images and whose query side embeds
the rows that carry a `text`, as (reference image, text) queries.

A row whose image cannot be read (a missing file, bytes that are no image) gets a null
embedding and the reason, naming the file, so that a job can count, report and skip it
instead of failing. Each actor rebuilds its encoder from the spec strings (a model is
never pickled); weights a spec does not load come from a fixed seed, so every actor,
job and run builds the same model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from cir import schemas
from cir.outputs import count_rows, read_table
from cir.progress import log
from cir.storage import split

PRECISIONS = ("fp32", "bf16")
# Init seed of the weights an encoder spec does not load (a built-in config): every
# encoding of the project uses it, so the composer's tower matches its cached features.
ENCODER_SEED = 0


@dataclass
class EmbedSettings:
    batch_size: int = 64
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    # GPUs per encoder actor: a number, or "auto" (1 when the cluster has GPUs, else 0).
    gpus_per_actor: float | str = "auto"
    # Torch threads inside each actor; 0: the node's cores shared among the actors.
    torch_threads: int = 0
    precision: str = "fp32"  # bf16 on GPUs

    def validate(self, where: str = "encode") -> None:
        if self.batch_size < 1 or self.num_actors < 1 or self.torch_threads < 0:
            raise ValueError(f"{where}: batch_size and num_actors must be >= 1 and torch_threads >= 0")
        if not 0 < self.cpus_per_actor <= 64:
            raise ValueError(f"{where}.cpus_per_actor must be in (0, 64], got {self.cpus_per_actor}")
        if isinstance(self.gpus_per_actor, str) and self.gpus_per_actor != "auto":
            raise ValueError(f"{where}.gpus_per_actor must be a number or 'auto', got {self.gpus_per_actor!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{where}.precision must be fp32 or bf16, got {self.precision!r}")


def read_image(data: bytes | None, path: str | None):
    """An RGB PIL image from encoded bytes, else from the file at `path`; a ValueError
    that names the file otherwise."""
    from cir.encoders import decode_image

    if data is None:
        if path is None:
            raise ValueError("row has neither image bytes nor a path")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return decode_image(data)
    except ValueError as exc:
        raise ValueError(f"{exc} ({path})" if path else str(exc)) from None


def _column(batch: pa.Table, name: str) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


class Embedder:
    """Ray Data callable class (also callable in-process): holds one encoder, built in
    the constructor, once per actor."""

    def __init__(self, encoder: str, image_encoder: str | None = None, threads: int = 0,
                 precision: str = "fp32", actors: int = 1):
        from cir.query_encoders import is_query_spec, load_query_encoder

        # 0 threads: this node's cores shared among the pool (counted here, on the worker).
        threads = threads or max(1, (os.cpu_count() or 1) // max(1, actors))
        if is_query_spec(encoder):
            self.model = load_query_encoder(encoder, image_encoder, threads=threads, precision=precision,
                                            seed=ENCODER_SEED)
            self._images, self._queries = self.model.encode_gallery, self.model.encode_queries
            self._query_images = self.model.uses_images
        else:
            from cir.encoders import ClipEncoder, seeded_init

            with seeded_init(ENCODER_SEED):
                self.model = ClipEncoder(encoder, threads=threads, precision=precision)
            self._images, self._queries, self._query_images = self.model.encode_images, None, True
        self.dim = int(self.model.dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        images, paths, texts = _column(batch, "image"), _column(batch, "path"), _column(batch, "text")
        queries = [i for i in range(n) if texts[i] is not None]
        if queries and self._queries is None:
            raise ValueError(f"{self.model.name} embeds images only: rows with a text need a "
                             "query encoder (baseline:... or checkpoint:...)")
        decoded, errors = [None] * n, [None] * n
        for i in range(n):
            if texts[i] is not None and not self._query_images:
                continue  # a text-only query needs no image
            try:
                decoded[i] = read_image(images[i], paths[i])
            except ValueError as exc:
                errors[i] = str(exc)
        vectors = np.zeros((n, self.dim), np.float32)
        gallery = [i for i in range(n) if texts[i] is None and errors[i] is None]
        queries = [i for i in queries if errors[i] is None]
        if gallery:
            vectors[gallery] = self._images([decoded[i] for i in gallery])
        if queries:
            vectors[queries] = self._queries([decoded[i] for i in queries], [texts[i] for i in queries])
        out = batch.select([c for c in batch.column_names if c not in ("image", "path", "text")])
        out = out.append_column("embedding", schemas.embedding_array(vectors, [e is None for e in errors]))
        return out.append_column("error", pa.array(errors, pa.string()))


def embed(dataset, encoder: str, settings: EmbedSettings | None = None, image_encoder: str | None = None):
    """The stage over a Ray Dataset (lazy): an actor pool of `Embedder`s (`cir.actor_pool`:
    a killed actor is restarted and its block redone), `num_gpus` per actor when the
    cluster has GPUs."""
    from cir.actor_pool import actor_pool
    from cir.raycluster import gpus_per_actor

    s = settings or EmbedSettings()
    return dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={"encoder": encoder, "image_encoder": image_encoder, "threads": s.torch_threads,
                               "precision": s.precision, "actors": s.num_actors},
        batch_size=s.batch_size, batch_format="pyarrow",
        **actor_pool(s.num_actors, num_cpus=s.cpus_per_actor, num_gpus=gpus_per_actor(s.gpus_per_actor)),
    )


class EmbedReport(NamedTuple):
    rows: int               # embeddings written
    dim: int
    bad: list[dict]         # {"image_id", "error"} of each image that could not be read


def write_embeddings(embedded, folder, model: str, rows_per_file: int = 50_000) -> EmbedReport:
    """Run the stage's output dataset and write its readable rows into `folder` (a
    stage's temporary folder) as an embeddings table, the model and dim in its schema
    metadata (`folder`: a local path or a `cir.storage` location). Unreadable images are
    logged by id and returned."""
    from ray.data.expressions import col

    encoded = embedded.materialize()
    bad = encoded.filter(expr=col("error").is_not_null()).select_columns(["image_id", "error"]).take_all()
    good = encoded.filter(expr=col("error").is_null()).select_columns(["image_id", "embedding"])
    dim = good.schema().base_schema.field("embedding").type.list_size
    fs, path = split(folder)
    good.write_parquet(path, filesystem=fs, schema=schemas.embeddings_schema(dim, model),
                       min_rows_per_file=min(rows_per_file, 10_000))
    for row in bad:
        log(f"embeddings: skipped {row['image_id']}: {row['error']}")
    rows = count_rows(folder)
    return EmbedReport(rows, dim, [{"image_id": r["image_id"], "error": r["error"]} for r in bad])


class Embeddings(NamedTuple):
    ids: np.ndarray          # [n] object, sorted
    vectors: np.ndarray      # [n, d] float32, rows in `ids` order
    model: str

    def index(self) -> dict[str, int]:
        return {i: n for n, i in enumerate(self.ids)}


def read_embeddings(folder) -> Embeddings:
    """An embeddings table, sorted by id so that results do not depend on the order in
    which Ray Data wrote its shards."""
    table = read_table(folder)
    model, _ = schemas.embeddings_metadata(table.schema)
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    return Embeddings(ids[order], schemas.embedding_matrix(table.column("embedding"))[order], model)
