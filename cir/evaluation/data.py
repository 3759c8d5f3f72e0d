"""The benchmark(s) of an eval run, checked before Ray starts, and the rows to encode."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from cir.benchmarks.base import Benchmark
from cir.evaluation.config import DEFAULT_SHAPES_DIR, EvalConfig


def prepare(cfg: EvalConfig) -> dict[str, Benchmark]:
    """Every check that needs no Ray, and the benchmark(s): the config, the model spec
    and encoder name (model mode), the annotation files, and (model mode) that every
    gallery image file exists. Jobs call this before starting Ray, so mistakes fail
    fast, naming the flag or file."""
    cfg.validate()
    if cfg.mode == "model":
        from cir.baselines import check_query_spec

        check_query_spec(cfg.model, cfg.encoder)
    benches = load_benchmarks(cfg)
    if cfg.mode == "model":
        for bench in benches.values():
            if bench.image_source is None:
                for image_id in bench.gallery_ids:
                    bench.image_path(image_id)  # FileNotFoundError naming the file(s) tried
    return benches


def ensure_shapes_benchmark(cfg: EvalConfig) -> Path:
    """The shapes benchmark folder: `cfg.data`, or the default one, written on first use
    with `cfg.shapes` (a default folder made with other settings is an error)."""
    from cir.data.shapes_corpus import write_benchmark

    if cfg.data:
        root = Path(cfg.data)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(
                f"shapes benchmark not found: {root / 'manifest.json'} (write one with "
                f"`python -m cir.data.shapes_corpus benchmark {root}`, or leave out --data "
                f"to use {DEFAULT_SHAPES_DIR})"
            )
        return root
    root = Path(DEFAULT_SHAPES_DIR)
    s = cfg.shapes
    want = {"seed": s.seed, "image_size": s.image_size,
            "splits": {"train": s.n_train, "val": s.n_val, "test": s.n_test}}
    manifest = root / "manifest.json"
    if not manifest.is_file():
        from cir.progress import log

        log(f"writing the shapes benchmark {want} into {root} (first use)")
        write_benchmark(root, seed=s.seed, n_train=s.n_train, n_val=s.n_val, n_test=s.n_test,
                        image_size=s.image_size, overwrite=root.exists())
        return root
    m = json.loads(manifest.read_text())
    have = {"seed": m.get("seed"), "image_size": m.get("image_size"),
            "splits": {k: v.get("queries") for k, v in m.get("splits", {}).items()}}
    if have != want:
        raise ValueError(
            f"{root} holds a shapes benchmark made with {have}, not the configured {want}: "
            f"pass --data for another folder, or delete {root} to rewrite it"
        )
    return root


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
        from cir.benchmarks.shapes import SPLITS

        check_split("shapes", split, SPLITS)  # before writing a default benchmark
        if cfg.annotations or cfg.images:
            raise ValueError("shapes takes --data (a benchmark folder), not --annotations / --images")
        return {"shapes": load_benchmark("shapes", split, ensure_shapes_benchmark(cfg))}
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
    pa.field("id", pa.string()),  # gallery image id | query id
    pa.field("image", pa.binary()),  # encoded image bytes, or
    pa.field("path", pa.string()),  # an image file
    pa.field("text", pa.string()),  # query text
])


def _image_ref(bench: Benchmark, image_id: str) -> tuple[bytes | None, str | None]:
    """(bytes, None) for in-memory benchmarks, else (None, path); a missing file raises
    FileNotFoundError naming it, before any Ray work starts."""
    if bench.image_source is not None:
        return bench.image_bytes(image_id), None
    return None, str(bench.image_path(image_id))


def work_table(benches: Sequence[Benchmark], uses_images: bool = True, uses_texts: bool = True) -> pa.Table:
    """Rows to encode: every gallery image, then every query, of each benchmark.

    Query rows carry the reference image only when the model uses it, and the text
    only when it uses texts. Image files are resolved here (on the driver), so a
    missing file fails at once with its path.
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
            add(part, "query", q.query_id, image, path, q.text if uses_texts else None)
    return pa.table(cols, schema=WORK_SCHEMA)
