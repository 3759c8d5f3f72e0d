"""Reader of the shapes-world CIR benchmark written by `cir.data.shapes_corpus.write_benchmark`.

Layout of `root` (see `write_benchmark`): `{train,val,test}/gallery.parquet` (CORPUS
schema: image_id, PNG bytes, exact caption, category) and `{split}/queries.parquet`
(TRIPLETS schema: triplet_id, ref_id, tgt_id, text in the held-out *human* phrasing,
reverse_text), plus `manifest.json`.

Protocol: plain Recall@{1,5,10,50} ("recall") over the split's gallery, with the
reference image REMOVED from the ranking (`exclude_reference=True`), as in CIRR. The
reference is in the gallery and, being one or two edits from the target, is the
nearest gallery image to any query that leans on the image: left in, it would take
rank 1 from every image-heavy query and make Recall@1 measure nothing but how much
a model ignores its reference. A target never equals its reference (every scene
appears once per gallery), so removing the reference never removes an answer.

Images come from the gallery table's PNG bytes (`Benchmark.image_source`); there is no
image folder. `meta["gallery_file"]` names the Parquet file, and `meta["captions"]`
maps image id -> exact caption (for tests and analyses, never for ranking).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cir.benchmarks.base import Benchmark, BenchmarkFormatError, Query, check_split

SPLITS = ("train", "val", "test")
DEFAULT_ROOT = "outputs/shapes-benchmark"


@dataclass
class ShapesBenchmarkConfig:
    """The shapes benchmark that is written on first use into `DEFAULT_ROOT`."""

    seed: int = 1
    n_train: int = 1000
    n_val: int = 500
    n_test: int = 500
    image_size: int = 64


def shapes_benchmark_root(root: str | Path | None = None, config: ShapesBenchmarkConfig | None = None) -> Path:
    """Where the shapes benchmark is: `root`, which must hold one; or, for None (or the
    default folder itself), `DEFAULT_ROOT`, written on first use with `config` (a
    default folder made with other settings is an error, never silently reused)."""
    from cir.data.shapes_corpus import write_benchmark
    from cir.progress import log

    if root is not None and Path(root).resolve() != Path(DEFAULT_ROOT).resolve():
        root = Path(root)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(
                f"shapes benchmark not found: {root / 'manifest.json'} (write one with "
                f"`python -m cir.data.shapes_corpus benchmark {root}`, or leave the folder out "
                f"to use {DEFAULT_ROOT})")
        return root
    root, c = Path(DEFAULT_ROOT), config or ShapesBenchmarkConfig()
    want = {"seed": c.seed, "image_size": c.image_size,
            "splits": {"train": c.n_train, "val": c.n_val, "test": c.n_test}}
    manifest = root / "manifest.json"
    if not manifest.is_file():
        log(f"writing the shapes benchmark {want} into {root} (first use)")
        write_benchmark(root, seed=c.seed, n_train=c.n_train, n_val=c.n_val, n_test=c.n_test,
                        image_size=c.image_size, overwrite=root.exists())
        return root
    m = json.loads(manifest.read_text())
    have = {"seed": m.get("seed"), "image_size": m.get("image_size"),
            "splits": {k: v.get("queries") for k, v in m.get("splits", {}).items()}}
    if have != want:
        raise ValueError(
            f"{root} holds a shapes benchmark made with {have}, not the configured {want}: "
            f"give another folder, or delete {root} to rewrite it")
    return root


def load_shapes(split: str, root: str | Path, image_dir: str | Path | None = None) -> Benchmark:
    """Read one split of a shapes benchmark folder `root` (from `write_benchmark`).

    `image_dir` exists only for the registry's common signature: the images are in
    the gallery table, so giving one is an error rather than silently ignored.
    """
    from cir.data.shapes_corpus import BENCHMARK_FORMAT, read_benchmark_split

    check_split("shapes", split, SPLITS)
    if image_dir is not None:
        raise ValueError(
            "shapes: the images are stored in the benchmark's gallery.parquet; "
            f"do not give an image folder (got {image_dir})"
        )
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"shapes benchmark folder not found: {root} (write one with "
            f"`python -m cir.data.shapes_corpus benchmark {root}`)"
        )
    gallery, queries = read_benchmark_split(root, split)  # names missing files
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(f"{manifest_path}: not valid JSON ({e})") from None
    if manifest.get("format") != BENCHMARK_FORMAT:
        raise BenchmarkFormatError(
            f"{manifest_path}: format is {manifest.get('format')!r}, expected {BENCHMARK_FORMAT!r}"
        )

    g = gallery.to_pydict()
    ids = g["image_id"]
    images = dict(zip(ids, g["image"]))
    missing_bytes = [i for i, b in images.items() if b is None]
    if missing_bytes:
        raise BenchmarkFormatError(
            f"{root / split / 'gallery.parquet'}: {len(missing_bytes)} gallery rows have no image "
            f"bytes (e.g. {missing_bytes[:3]})"
        )
    in_gallery = set(ids)
    q = queries.to_pydict()
    out = []
    queries_file = root / split / "queries.parquet"
    for i, (qid, ref, tgt, text, rev) in enumerate(
        zip(q["triplet_id"], q["ref_id"], q["tgt_id"], q["text"], q["reverse_text"])
    ):
        for what, image_id in (("ref_id", ref), ("tgt_id", tgt)):
            if image_id not in in_gallery:
                raise BenchmarkFormatError(
                    f"{queries_file}: row {i} ({qid}) {what} {image_id!r} is not in the gallery"
                )
        if ref == tgt:
            raise BenchmarkFormatError(f"{queries_file}: row {i} ({qid}) has its reference as target")
        out.append(Query(query_id=qid, ref_id=ref, text=text, target_ids=(tgt,),
                         meta={"reverse_text": rev}))

    def image_source(image_id: str) -> bytes:
        try:
            return images[image_id]
        except KeyError:
            raise KeyError(f"shapes {split}: image {image_id!r} is not in the gallery") from None

    return Benchmark(
        name="shapes",
        split=split,
        queries=out,
        gallery_ids=list(ids),
        image_dir=None,
        protocol="recall",
        exclude_reference=True,
        image_source=image_source,
        meta={
            "root": str(root),
            "gallery_file": str(root / split / "gallery.parquet"),
            "queries_file": str(queries_file),
            "seed": manifest.get("seed"),
            "manifest": manifest,
            "captions": dict(zip(ids, g["caption"])),
        },
    )

