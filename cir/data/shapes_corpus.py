"""Write shapes-world datasets: an image-caption corpus and a CIR benchmark with exact targets.

Both writers are deterministic from a seed and write into a temporary sibling folder that
is renamed into place at the end, so a crash never leaves a folder that looks complete.

Scenes are partitioned by a stable hash of their caption (`partition`): corpora only use
"corpus" scenes and each benchmark split only its own, so whatever the seeds, no test
scene is ever in a training corpus and the benchmark splits share no scene. (Separate
seed streams alone would not do: there are only 432 one-object scenes.)

Random streams are derived with `numpy.random.SeedSequence(seed, spawn_key=(purpose, ...))`
so the corpus and the benchmark made from the same seed never draw from the same stream,
and the scene, text and rendering draws are separate: changing a text template does not
change which scenes a seed gives.

    python -m cir.data.shapes_corpus corpus OUT --n 200 --seed 0
    python -m cir.data.shapes_corpus benchmark OUT --seed 1
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir.data.edits import apply_edit, diff, edit_text, random_edit
from cir.data.shapes import Scene, caption, random_scene, render
from cir.outputs import atomic_path
from cir import storage
from cir.storage import resolve
from cir.schemas import CORPUS, TRIPLETS, require_columns

BENCHMARK_FORMAT = "cir-shapes-benchmark"
BENCHMARK_VERSION = 1
SPLITS = ("train", "val", "test")
HUMAN_GENERATOR = "shapes-human"
TWO_EDIT_FRACTION = 0.3  # share of benchmark queries whose target is two edits away
MAX_OBJECTS = 4  # objects per scene in both writers (edits keep scenes within it)

# Purpose keys of the seed streams; arbitrary but fixed forever (changing them changes data).
_CORPUS_STREAM = 0xC0
_BENCH_STREAM = 0xBE
_SCENES, _TEXTS, _RENDER = 0, 1, 2
_MAX_TRIES = 1000
# Share of scene space: corpus 4/8, benchmark train 2/8, val 1/8, test 1/8.
_PARTS = ("corpus",) * 4 + ("train",) * 2 + ("val", "test")


def partition(scene: Scene) -> str:
    """Which dataset may use `scene`: "corpus", "train", "val" or "test".

    A fixed function of the caption (blake2b, not Python's salted hash()), so it is the
    same in every process and release.
    """
    digest = hashlib.blake2b(caption(scene).encode(), digest_size=8).digest()
    return _PARTS[int.from_bytes(digest, "big") % len(_PARTS)]


def _fresh_scene(rng, part: str, taken) -> Scene:
    """A random scene of partition `part` not in `taken`."""
    for _ in range(100 * _MAX_TRIES):
        scene = random_scene(rng, 1, MAX_OBJECTS)
        if scene not in taken and partition(scene) == part:
            return scene
    raise RuntimeError(f"could not draw a new {part} scene; the scene space is exhausted")


def _edited(rng, scene: Scene, n_edits: int, part: str, taken, exact: bool = True):
    """`scene` after `n_edits` random edits (a uniform count in 1..n_edits if not
    `exact`), landing in partition `part`, not in `taken`, and exactly that many edits
    away by `diff` (chained edits can cancel or compound); None if none is found."""
    for _ in range(_MAX_TRIES):
        k = n_edits if exact else int(rng.integers(1, n_edits + 1))
        out = scene
        for _ in range(k):
            out = apply_edit(out, random_edit(rng, out, MAX_OBJECTS))
        if out not in taken and len(diff(scene, out)) == k and partition(out) == part:
            return out
    return None


def _stream(seed: int, *key: int) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def _png(scene: Scene, image_size: int, seed: int) -> bytes:
    buf = io.BytesIO()
    render(scene, image_size, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def _atomic_dir(out_dir, overwrite: bool):
    """Yield a temporary folder (`cir.outputs.atomic_path`); on success it replaces `out_dir`.

    An existing non-empty `out_dir` is an error unless `overwrite`, checked before any
    work so a long write does not fail at the very end.
    """
    out = resolve(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    with atomic_path(out, directory=True) as tmp:
        yield tmp


def _corpus_table(ids, images, captions, categories) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(images, pa.binary()),
         pa.array(captions, pa.string()), pa.array(categories, pa.string())],
        schema=CORPUS,
    )


# -------------------------------------------------------------------------- corpus

def corpus_scenes(n_images: int, seed: int = 0, family_size: int = 8) -> list[tuple[Scene, int]]:
    """(scene, family index) for every corpus row, without rendering: the scene plan
    that `write_corpus` renders. Scenes are unique; members follow their base."""
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if family_size < 1:
        raise ValueError(f"family_size must be at least 1, got {family_size}")
    rng = _stream(seed, _CORPUS_STREAM, _SCENES)
    seen: set[Scene] = set()
    rows: list[tuple[Scene, int]] = []
    family = 0
    while len(rows) < n_images:
        base = _fresh_scene(rng, "corpus", seen)
        seen.add(base)
        rows.append((base, family))
        for _ in range(min(family_size - 1, n_images - len(rows))):
            member = _edited(rng, base, 3, "corpus", seen, exact=False)
            if member is None:
                break  # a crowded family ends early; the next family fills the rows
            seen.add(member)
            rows.append((member, family))
        family += 1
    return rows


def write_corpus(out_dir, n_images: int, seed: int = 0, image_size: int = 64,
                 family_size: int = 8, rows_per_shard: int = 4096,
                 overwrite: bool = False) -> Path:
    """Write a corpus table (schema `cir.schemas.CORPUS`) as Parquet shards
    `part-00000.parquet`, ... in `out_dir`, and return `out_dir`.

    The corpus is made of families, like real collections with near-duplicates: a
    random base scene, then up to `family_size - 1` members each 1-3 edits from the base.
    Rows: `image_id` "shapes-000123" (row number, zero padded, stable for a seed),
    `image` PNG bytes, `caption` the exact caption (`parse_caption` recovers the scene),
    `category` the family, "family-0012". Every scene appears once, and only scenes of
    the "corpus" partition are used, so no corpus shares a scene with a benchmark.
    """
    with _atomic_dir(out_dir, overwrite) as tmp:
        write_corpus_files(tmp, n_images, seed, image_size, family_size, rows_per_shard)
    return resolve(out_dir)


def write_corpus_files(folder, n_images: int, seed: int = 0, image_size: int = 64,
                       family_size: int = 8, rows_per_shard: int = 4096) -> None:
    """`write_corpus`'s shards into `folder` (local or a `cir.storage` location), with no
    commit of their own: for a folder that is already a stage's temporary one."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    folder = resolve(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = corpus_scenes(n_images, seed, family_size)
    render_seeds = _stream(seed, _CORPUS_STREAM, _RENDER).integers(2**31, size=len(plan))
    for shard, start in enumerate(range(0, len(plan), rows_per_shard)):
        idx = range(start, min(start + rows_per_shard, len(plan)))
        table = _corpus_table(
            [f"shapes-{i:06d}" for i in idx],
            [_png(plan[i][0], image_size, int(render_seeds[i])) for i in idx],
            [caption(plan[i][0]) for i in idx],
            [f"family-{plan[i][1]:04d}" for i in idx],
        )
        fs, where = storage.split(folder / f"part-{shard:05d}.parquet")
        pq.write_table(table, where, filesystem=fs)


# ----------------------------------------------------------------------- benchmark

def _split_plan(rng, split: str, n_queries: int, gallery_extra: int):
    """Queries (ref, tgt) and the split's gallery: each query's reference and target plus
    `gallery_extra` hard negatives, alternately one-edit (rarely two-edit) variants of
    the reference (they defeat a model that ignores the text) and of the target (they
    show the text's change but differ elsewhere, defeating a model that ignores the
    image).
    All gallery scenes are distinct and of the split's partition, so each query's
    target is unique in the gallery and no split shares a scene with another.
    Returns (queries, gallery scenes, group index of each gallery scene)."""
    gallery: list[Scene] = []
    groups: list[int] = []
    taken: set[Scene] = set()
    queries: list[tuple[Scene, Scene]] = []
    while len(queries) < n_queries:
        ref = _fresh_scene(rng, split, taken)
        n_edits = 2 if rng.random() < TWO_EDIT_FRACTION else 1
        tgt = _edited(rng, ref, n_edits, split, taken)
        if tgt is None:
            continue
        new = [ref, tgt]
        taken.update(new)
        for j in range(gallery_extra):
            anchor = ref if j % 2 == 0 else tgt
            # A crowded scene may have no one-edit variant left in this split's partition.
            v = _edited(rng, anchor, 1, split, taken) or _edited(rng, anchor, 2, split, taken)
            if v is not None:
                new.append(v)
                taken.add(v)
        gallery += new
        groups += [len(queries)] * len(new)
        queries.append((ref, tgt))
    return queries, gallery, groups


def _write_split(split_dir: Path, split: str, seed: int, split_index: int, n_queries: int,
                 image_size: int, gallery_extra: int) -> tuple[int, int]:
    queries, gallery, groups = _split_plan(
        _stream(seed, _BENCH_STREAM, split_index, _SCENES), split, n_queries, gallery_extra)
    # Shuffle so that ids carry no hint of which image is whose reference or target.
    render_rng = _stream(seed, _BENCH_STREAM, split_index, _RENDER)
    order = render_rng.permutation(len(gallery))
    render_seeds = render_rng.integers(2**31, size=len(gallery))
    scenes = [gallery[i] for i in order]
    ids = [f"{split}-{k:06d}" for k in range(len(scenes))]
    id_of = {s: i for s, i in zip(scenes, ids)}
    split_dir.mkdir()
    pq.write_table(_corpus_table(
        ids,
        [_png(s, image_size, int(r)) for s, r in zip(scenes, render_seeds)],
        [caption(s) for s in scenes],
        [f"{split}-set-{groups[i]:06d}" for i in order],
    ), split_dir / "gallery.parquet")

    text_rng = _stream(seed, _BENCH_STREAM, split_index, _TEXTS)
    texts, reverse = [], []
    for ref, tgt in queries:
        texts.append(edit_text(diff(ref, tgt), "human", text_rng, scene=ref))
        reverse.append(edit_text(diff(tgt, ref), "human", text_rng, scene=tgt))
    n = len(queries)
    pq.write_table(pa.Table.from_arrays([
        pa.array([f"{split}-query-{q:06d}" for q in range(n)], pa.string()),
        pa.array([id_of[r] for r, _ in queries], pa.string()),
        pa.array([id_of[t] for _, t in queries], pa.string()),
        pa.array(texts, pa.string()),
        pa.array(reverse, pa.string()),
        pa.array(["human"] * n, pa.string()),
        pa.array([HUMAN_GENERATOR] * n, pa.string()),
        pa.array([None] * n, pa.float32()),
    ], schema=TRIPLETS), split_dir / "queries.parquet")
    return n, len(scenes)


def write_benchmark(out_dir, seed: int = 1, n_train: int = 1000, n_val: int = 500,
                    n_test: int = 500, image_size: int = 64, gallery_extra: int = 3,
                    overwrite: bool = False) -> Path:
    """Write a CIR benchmark with exact targets and return `out_dir`.

    Layout: `{train,val,test}/gallery.parquet` (CORPUS schema; ids "val-000042";
    `category` "val-set-000007" names the query whose reference, target and hard
    negatives the image was drawn for), `{split}/queries.parquet` (TRIPLETS schema; text
    and reverse_text in the held-out *human* phrasing; source "human"), `manifest.json`.
    Queries are 1 edit (70%) or 2 edits (30%) away from their target. Each split's
    gallery holds every scene once: a query's target is the only image whose scene is
    the edited reference. `gallery_extra` hard negatives are added per query,
    alternating a variant of the reference and one of the target (default 3: two of
    the reference, one of the target), so a gallery has about 5 images per query.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in sizes.values()) or not any(sizes.values()):
        raise ValueError(f"split sizes must be >= 0 and not all 0, got {sizes}")
    if gallery_extra < 0:
        raise ValueError(f"gallery_extra must be >= 0, got {gallery_extra}")
    manifest = {
        "format": BENCHMARK_FORMAT, "format_version": BENCHMARK_VERSION, "seed": int(seed),
        "image_size": image_size, "phrasing": "human", "generator": HUMAN_GENERATOR,
        "gallery_extra": gallery_extra, "two_edit_fraction": TWO_EDIT_FRACTION,
        "max_objects": MAX_OBJECTS, "splits": {},
    }
    with _atomic_dir(out_dir, overwrite) as tmp:
        for i, split in enumerate(SPLITS):
            n_q, n_g = _write_split(tmp / split, split, seed, i, sizes[split], image_size,
                                    gallery_extra)
            manifest["splits"][split] = {"queries": n_q, "gallery": n_g}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def read_benchmark_split(out_dir, split: str) -> tuple[pa.Table, pa.Table]:
    """(gallery, queries) of one split of a benchmark written by `write_benchmark`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(out_dir)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a shapes benchmark (no manifest.json); write one with "
            f"`python -m cir.data.shapes_corpus benchmark {root}`")
    tables = []
    for name, schema, what in (("gallery", CORPUS, "gallery"), ("queries", TRIPLETS, "queries")):
        path = root / split / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"benchmark split {split!r} has no {name} file: {path}")
        table = pq.read_table(path)
        require_columns(table.schema, schema.names, f"{what} table {path}")
        tables.append(table)
    return tables[0], tables[1]


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cir.data.shapes_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="write an image-caption corpus")
    c.add_argument("out")
    c.add_argument("--n", type=int, default=200, help="number of images")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--family-size", type=int, default=8)
    c.add_argument("--rows-per-shard", type=int, default=4096)
    b = sub.add_parser("benchmark", help="write a CIR benchmark with exact targets")
    b.add_argument("out")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--n-train", type=int, default=1000)
    b.add_argument("--n-val", type=int, default=500)
    b.add_argument("--n-test", type=int, default=500)
    b.add_argument("--gallery-extra", type=int, default=3)
    for q in (c, b):
        q.add_argument("--image-size", type=int, default=64)
        q.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    start = time.perf_counter()
    if a.command == "corpus":
        out = write_corpus(a.out, a.n, seed=a.seed, image_size=a.image_size,
                           family_size=a.family_size, rows_per_shard=a.rows_per_shard,
                           overwrite=a.overwrite)
        print(f"wrote {a.n} images to {out} in {time.perf_counter() - start:.1f} s")
    else:
        out = write_benchmark(a.out, seed=a.seed, n_train=a.n_train, n_val=a.n_val,
                              n_test=a.n_test, image_size=a.image_size,
                              gallery_extra=a.gallery_extra, overwrite=a.overwrite)
        splits = json.loads((out / "manifest.json").read_text())["splits"]
        print(f"wrote benchmark {out} in {time.perf_counter() - start:.1f} s: "
              + ", ".join(f"{k} {v['queries']} queries / {v['gallery']} images"
                          for k, v in splits.items()))


if __name__ == "__main__":
    main()
