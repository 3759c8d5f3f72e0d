"""Model mode's one Ray Data pass: gallery images and queries through `QueryEncoderActor`."""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
import pyarrow as pa

from cir.benchmarks.base import Benchmark
from cir.evaluation.config import EncodeSettings
from cir.evaluation.data import work_table
from cir.raycluster import gpus_per_actor


def _out_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("part", pa.int32()), pa.field("kind", pa.string()), pa.field("id", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)), pa.field("error", pa.string()),
    ])


class QueryEncoderActor:
    """Ray Data callable class: rows of `WORK_SCHEMA` -> part, kind, id, embedding, error.

    Holds one query encoder (built from its spec strings in the constructor, once per
    actor). Gallery rows go through `encode_gallery`, query rows through
    `encode_queries`. A row whose image cannot be read gets a null embedding and the
    reason in `error`; the driver reports those by id and path.
    """

    def __init__(self, spec: str, encoder: str | None, threads: int = 0, precision: str = "fp32",
                 device: str | None = None, actors: int = 1):
        from cir.baselines import load_query_encoder

        # 0 threads: this node's cores shared among the pool (counted here, on the worker).
        threads = threads or max(1, (os.cpu_count() or 1) // max(1, actors))
        self.threads = threads
        self.model = load_query_encoder(spec, encoder, device=device, threads=threads,
                                        precision=precision)
        self.schema = _out_schema(self.model.dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cir.encoders import decode_image

        n = batch.num_rows
        kinds = batch.column("kind").to_pylist()
        images = batch.column("image").to_pylist()
        paths = batch.column("path").to_pylist()
        texts = batch.column("text").to_pylist()
        decoded: list = [None] * n
        errors: list = [None] * n
        for i in range(n):
            if images[i] is None and paths[i] is None:
                if kinds[i] == "gallery" or getattr(self.model, "uses_images", True):
                    errors[i] = "row has neither image bytes nor a path"
                continue
            try:
                data = images[i]
                if data is None:
                    try:
                        with open(paths[i], "rb") as fh:
                            data = fh.read()
                    except OSError as exc:
                        raise ValueError(f"cannot read {paths[i]}: {exc.strerror or exc}") from exc
                decoded[i] = decode_image(data)
            except ValueError as exc:
                named = paths[i] is None or paths[i] in str(exc)
                errors[i] = str(exc) if named else f"{exc} ({paths[i]})"
        vectors = np.zeros((n, self.model.dim), np.float32)
        gal = [i for i in range(n) if kinds[i] == "gallery" and errors[i] is None]
        qry = [i for i in range(n) if kinds[i] == "query" and errors[i] is None]
        if gal:
            vectors[gal] = self.model.encode_gallery([decoded[i] for i in gal])
        if qry:
            vectors[qry] = self.model.encode_queries([decoded[i] for i in qry], [texts[i] for i in qry])
        bad = pa.array([e is not None for e in errors])
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.model.dim,
                                                      mask=bad)
        return pa.table({"part": batch.column("part"), "kind": batch.column("kind"),
                         "id": batch.column("id"), "embedding": embedding,
                         "error": pa.array(errors, pa.string())}, schema=self.schema)


def encode_benchmarks(
    benches: Sequence[Benchmark], spec: str, encoder: str | None, settings: EncodeSettings | None = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """[(query_emb [Q, d], gallery_emb [G, d])] per benchmark, rows aligned with
    `bench.queries` / `bench.gallery_ids`, from one Ray Data pass; and run info.

    Needs a running Ray (the caller's); raises ValueError naming unreadable images.
    """
    import ray

    from cir.baselines import check_query_spec

    if not ray.is_initialized():
        raise RuntimeError("encode_benchmarks needs a running Ray: call cir.raycluster.init_ray() first")
    s = settings or EncodeSettings()
    parsed = check_query_spec(spec, encoder)
    uses_images = parsed.kind != "baseline" or parsed.value != "text-only"
    uses_texts = parsed.kind != "baseline" or parsed.value != "image-only"
    t0 = time.perf_counter()
    table = work_table(benches, uses_images, uses_texts)
    step = s.rows_per_block
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    gpus = gpus_per_actor(s.gpus_per_actor)
    out = ds.map_batches(
        QueryEncoderActor,
        fn_constructor_kwargs={"spec": spec, "encoder": encoder, "threads": s.torch_threads,
                               "precision": s.precision, "actors": s.num_actors},
        batch_size=s.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=s.num_actors),
        num_cpus=s.cpus_per_actor, num_gpus=gpus,
    )
    result = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows])
    seconds = time.perf_counter() - t0
    if result.num_rows != table.num_rows:
        raise RuntimeError(f"encoded {result.num_rows} rows of {table.num_rows}")
    errors = [(p, k, i, e) for p, k, i, e in zip(*(result.column(c).to_pylist()
                                                   for c in ("part", "kind", "id", "error"))) if e]
    if errors:
        shown = "; ".join(f"{benches[p].name} {k} {i}: {e}" for p, k, i, e in errors[:5])
        raise ValueError(f"{len(errors)} image(s) could not be read: {shown}")

    parts = np.asarray(result.column("part").to_numpy())
    kinds = np.asarray(result.column("kind").to_pylist(), dtype=object)
    ids = np.asarray(result.column("id").to_pylist(), dtype=object)
    emb_col = result.column("embedding").combine_chunks()
    dim = emb_col.type.list_size
    vectors = emb_col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    per_bench = []
    for p, bench in enumerate(benches):
        embs = []
        for kind, want in (("query", bench.query_ids), ("gallery", bench.gallery_ids)):
            sel = np.flatnonzero((parts == p) & (kinds == kind))
            row_of = dict(zip(ids[sel], sel))
            if len(row_of) != len(want) or any(w not in row_of for w in want):
                raise RuntimeError(f"{bench.name}: {kind} embeddings do not match its ids")
            embs.append(np.ascontiguousarray(vectors[[row_of[w] for w in want]], dtype=np.float32))
        per_bench.append((embs[0], embs[1]))
    info = {"rows": table.num_rows, "seconds": seconds, "rows_per_s": table.num_rows / max(seconds, 1e-9),
            "dim": int(dim), "num_actors": s.num_actors, "gpus_per_actor": gpus,
            "batch_size": s.batch_size, "torch_threads": s.torch_threads or "auto"}
    return per_bench, info
