"""The benchmark(s) of an eval run, checked before Ray starts, and the rows to encode."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa

from cir.benchmarks.base import Benchmark
from cir.evaluation.config import EvalConfig


def prepare(cfg: EvalConfig) -> dict[str, Benchmark]:
    """Every check that needs no Ray, and the benchmark(s): the config, the model spec
    and encoder name (model mode), the annotation files, and (model mode) that every
    gallery image file exists. Jobs call this before starting Ray, so mistakes fail
    fast, naming the flag or file."""
    cfg.validate()
    if cfg.mode == "model":
        from cir.query_encoders import check_query_spec

        check_query_spec(cfg.model, cfg.encoder)
    benches = load_benchmarks(cfg)
    if cfg.mode == "model":
        for bench in benches.values():
            if bench.image_source is None:
                for image_id in bench.gallery_ids:
                    bench.image_path(image_id)  # FileNotFoundError naming the file(s) tried
    return benches


def load_benchmarks(cfg: EvalConfig) -> dict[str, Benchmark]:
    """The benchmark(s) of `cfg`, keyed by name: one, or FashionIQ's three categories."""
    from cir.benchmarks import benchmark_names, load_benchmark, load_fashioniq_all

    name, split = cfg.benchmark, cfg.resolved_split
    known = sorted(set(benchmark_names()) | {"fashioniq"})
    if name not in known:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(known)}")
    needs_images = cfg.mode == "model"
    if name == "shapes":
        from cir.benchmarks.base import check_split
        from cir.benchmarks.shapes import SPLITS, shapes_benchmark_root

        check_split("shapes", split, SPLITS)  # before writing a default benchmark
        if cfg.annotations or cfg.images:
            raise ValueError("shapes takes --data (a benchmark folder), not --annotations / --images")
        return {"shapes": load_benchmark("shapes", split, shapes_benchmark_root(cfg.data, cfg.shapes))}
    if cfg.data:
        raise ValueError(f"--data is for the shapes benchmark; {name} takes --annotations and --images")
    if not cfg.annotations:
        raise ValueError(
            f"{name} needs --annotations (the folder holding its annotation files, e.g. "
            "captions/ and image_splits/ for CIRR and FashionIQ, annotations/ for CIRCO)")
    ann = Path(cfg.annotations)
    if not ann.is_dir():
        raise FileNotFoundError(f"annotations folder not found: {ann}")
    if needs_images and not cfg.images:
        raise ValueError(f"encoding {name}'s gallery needs --images (its image folder); "
                         "or score ranked ids with --predictions")
    if cfg.images and not Path(cfg.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {cfg.images}")
    if name == "fashioniq":
        return {b.name: b for b in load_fashioniq_all(split, ann, cfg.images).values()}
    return {name: load_benchmark(name, split, ann, cfg.images)}


WORK_SCHEMA = pa.schema([
    pa.field("part", pa.int32()),  # which benchmark
    pa.field("kind", pa.string()),  # "gallery" | "query"
    pa.field("image_id", pa.string()),  # gallery image id | query id
    pa.field("image", pa.binary()),  # encoded image bytes, or
    pa.field("path", pa.string()),  # an image file
    pa.field("text", pa.string()),  # query text: the embedding stage composes these rows as queries
])


def _image_ref(bench: Benchmark, image_id: str) -> tuple[bytes | None, str | None]:
    """(bytes, None) for in-memory benchmarks, else (None, path); a missing file raises
    FileNotFoundError naming it, before any Ray work starts."""
    if bench.image_source is not None:
        return bench.image_bytes(image_id), None
    return None, str(bench.image_path(image_id))


def work_table(benches: Sequence[Benchmark], uses_images: bool = True) -> pa.Table:
    """Rows to encode: every gallery image, then every query, of each benchmark.

    Query rows carry the reference image only when the model uses it. Image files are
    resolved here (on the driver), so a missing file fails at once with its path.
    """
    cols: dict[str, list] = {n: [] for n in WORK_SCHEMA.names}

    def add(part, kind, id_, image, path, text):
        for key, value in zip(WORK_SCHEMA.names, (part, kind, id_, image, path, text)):
            cols[key].append(value)

    for part, bench in enumerate(benches):
        if not bench.gallery_ids:
            raise ValueError(f"{bench.name} {bench.split}: the gallery is empty (for CIRCO, "
                             "give the COCO unlabeled2017 folder as --images)")
        refs = {}
        for image_id in bench.gallery_ids:
            refs[image_id] = _image_ref(bench, image_id)
            add(part, "gallery", image_id, *refs[image_id], None)
        for q in bench.queries:
            image, path = (refs.get(q.ref_id) or _image_ref(bench, q.ref_id)) if uses_images else (None, None)
            add(part, "query", q.query_id, image, path, q.text)
    return pa.table(cols, schema=WORK_SCHEMA)
