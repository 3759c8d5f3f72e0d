"""Model mode's one Ray Data pass: every gallery image and every query of the run's
benchmark(s) through the embedding stage (`cir.embed`), with the query encoder."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pyarrow as pa

from cir.benchmarks.base import Benchmark
from cir.evaluation.config import EncodeSettings
from cir.evaluation.data import work_table


def encode_benchmarks(
    benches: Sequence[Benchmark], spec: str, encoder: str | None, settings: EncodeSettings | None = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """[(query_emb [Q, d], gallery_emb [G, d])] per benchmark, rows aligned with
    `bench.queries` / `bench.gallery_ids`, from one Ray Data pass; and run info.

    Needs a running Ray (the caller's); raises ValueError naming unreadable images.
    """
    import ray

    from cir.embed import embed
    from cir.query_encoders import check_query_spec
    from cir.raycluster import dataset_from_table, gpus_per_actor
    from cir.schemas import embedding_matrix

    if not ray.is_initialized():
        raise RuntimeError("encode_benchmarks needs a running Ray: call cir.raycluster.init_ray() first")
    s = settings or EncodeSettings()
    parsed = check_query_spec(spec, encoder)
    t0 = time.perf_counter()
    table = work_table(benches, uses_images=(parsed.kind, parsed.value) != ("baseline", "text-only"))
    out = embed(dataset_from_table(table, s.rows_per_block), spec, s, image_encoder=encoder)
    result = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows])
    seconds = time.perf_counter() - t0
    if result.num_rows != table.num_rows:
        raise RuntimeError(f"encoded {result.num_rows} rows of {table.num_rows}")
    columns = [result.column(c).to_pylist() for c in ("part", "kind", "image_id", "error")]
    errors = [(p, k, i, e) for p, k, i, e in zip(*columns) if e]
    if errors:
        shown = "; ".join(f"{benches[p].name} {k} {i}: {e}" for p, k, i, e in errors[:5])
        raise ValueError(f"{len(errors)} image(s) could not be read: {shown}")

    parts = np.asarray(result.column("part").to_numpy())
    kinds = np.asarray(columns[1], dtype=object)
    ids = np.asarray(columns[2], dtype=object)
    vectors = embedding_matrix(result.column("embedding"))
    per_bench = []
    for p, bench in enumerate(benches):
        embs = []
        for kind, want in (("query", bench.query_ids), ("gallery", bench.gallery_ids)):
            sel = np.flatnonzero((parts == p) & (kinds == kind))
            row_of = dict(zip(ids[sel], sel))
            if len(row_of) != len(want) or any(w not in row_of for w in want):
                raise RuntimeError(f"{bench.name}: {kind} embeddings do not match its ids")
            embs.append(vectors[[row_of[w] for w in want]])
        per_bench.append((embs[0], embs[1]))
    info = {"rows": table.num_rows, "seconds": seconds, "rows_per_s": table.num_rows / max(seconds, 1e-9),
            "dim": int(vectors.shape[1]), "num_actors": s.num_actors,
            "gpus_per_actor": gpus_per_actor(s.gpus_per_actor), "batch_size": s.batch_size,
            "torch_threads": s.torch_threads or "auto"}
    return per_bench, info
