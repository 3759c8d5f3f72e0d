"""The frozen vision tower's feature cache: the images of a benchmark split, encoded once
by the embedding stage (`cir.embed`, an actor pool on Ray Data, never the driver) into
an embeddings table beside the runs.

`<run.storage>/features/<benchmark>-<split>-<digest>/` is an `OutputDir` stage, committed
atomically. The digest is of what the features are a function of (the vision model,
where the images come from, the ids), so a cache is never stale: later stages, reruns
and other runs on the same images and tower reuse it, and another tower or other
images get a folder of their own.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from cir.embed import EmbedSettings
from cir.outputs import OutputDir
from cir.progress import log

IMAGES_SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("image", pa.binary()),
                           pa.field("path", pa.string())])


class ImageFeatures(NamedTuple):
    index: dict[str, int]    # image id -> row of `vectors`
    vectors: np.ndarray      # [n, d] float32 pooled embeddings
    failed: dict[str, str]   # image id -> why it could not be read (missing file, no image)


def _no_features(failed: dict[str, str]) -> ImageFeatures:
    return ImageFeatures({}, np.zeros((0, 0), np.float32), failed)


def image_refs(bench, image_ids) -> tuple[pa.Table, dict[str, str]]:
    """The images to encode (bytes of an in-memory benchmark, else file paths) and the
    ids whose file is missing, with the reason."""
    rows, missing = [], {}
    for image_id in image_ids:
        if bench.image_source is not None:
            rows.append((image_id, bench.image_bytes(image_id), None))
            continue
        try:
            rows.append((image_id, None, str(bench.image_path(image_id))))
        except FileNotFoundError as exc:
            missing[image_id] = str(exc)
    return pa.Table.from_pylist([dict(zip(IMAGES_SCHEMA.names, r)) for r in rows], schema=IMAGES_SCHEMA), missing


def image_source(bench) -> str:
    """Where a benchmark's images come from: its image folder, or for one held in a file
    (shapes' gallery.parquet) that file with its size and modification time."""
    if bench.image_source is None:
        return str(Path(bench.image_dir).resolve())
    stat = Path(bench.meta["gallery_file"]).stat()
    return f"{Path(bench.meta['gallery_file']).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def benchmark_features(bench, image_ids, vision: str, cache_root: str | Path,
                       settings: EmbedSettings | None = None) -> ImageFeatures:
    """Features of `image_ids` (in the order given) of a loaded `cir.benchmarks.Benchmark`."""
    from cir.embed import embed, read_embeddings, write_embeddings
    from cir.encoders import validate_encoder_name
    from cir.raycluster import dataset_from_table

    s = settings or EmbedSettings()
    images, failed = image_refs(bench, list(dict.fromkeys(image_ids)))
    model = str(validate_encoder_name(vision))
    if images.num_rows == 0:
        return _no_features(failed)
    ids = sorted(images.column("image_id").to_pylist())
    fingerprint = {"encoder": model, "source": image_source(bench), "images": len(ids),
                   "ids_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest()}
    digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    out, key = OutputDir(cache_root), f"{bench.name}-{bench.split}-{digest}"
    if out.done(key):
        log(f"features: reusing {out.path(key)} ({len(ids)} images, {model})")
    else:
        log(f"features: encoding {len(ids)} images of {bench.name} {bench.split} with {model} "
            f"({s.num_actors} encoder actor(s)) into {out.path(key)}")
        rows_per_block = -(-images.num_rows // (4 * s.num_actors))  # work for every actor
        t0 = time.perf_counter()
        with out.stage(key, fingerprint) as (tmp, manifest):
            report = write_embeddings(embed(dataset_from_table(images, rows_per_block), vision, s), tmp, model)
            manifest.update(rows=report.rows, bad_images=report.bad, seconds=round(time.perf_counter() - t0, 3))
        log(f"features: {report.rows} images encoded in {manifest['seconds']:.1f}s")
    manifest = out.manifest(key)
    failed.update((b["image_id"], b["error"]) for b in manifest["bad_images"])
    if manifest["rows"] == 0:
        return _no_features(failed)
    emb = read_embeddings(out.path(key))
    return ImageFeatures(emb.index(), emb.vectors, failed)
