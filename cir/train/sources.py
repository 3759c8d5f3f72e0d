"""Triplet sources for composer training, as one table of training examples.

Every source yields the same columns: `ref_feat` and `tgt_feat` (pooled image
embeddings of the composer's frozen vision tower, fixed_size_list<float32>[d]),
`text`, `reverse_text` (the target -> reference text, for PTHA; may be null) and
`source`. With the vision tower frozen its output is a pure function of the image,
so it is computed once per image (by the synth job's embeddings stage, or by
`encode_images` here) instead of once per step.

* `synth_triplets`: the triplets table of `jobs/synth.py` joined with its embeddings.
* `slerp_triplets`: CoLLM's on-the-fly triplets from a corpus and its embeddings:
  the reference embedding is a Slerp between an image's embedding and its nearest
  neighbour's, the text comes from caption templates (`synthetic_share` of samples)
  or is the target's own caption.
* `benchmark_triplets`: the shapes benchmark's annotated train split.
* `reader_triplets`: the train split of any `cir.benchmarks` reader (CIRR, FashionIQ)
  whose images are given: each image the queries use is read and encoded once.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from cir import schemas
from cir.outputs import read_table

EXAMPLE_COLUMNS = ("ref_feat", "tgt_feat", "text", "reverse_text", "source")


def feature_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def feature_matrix(column) -> np.ndarray:
    """[n, d] float32 from a fixed_size_list column (pyarrow) or an object array of rows."""
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return np.stack(column).astype(np.float32, copy=False)


def examples_table(ref: np.ndarray, tgt: np.ndarray, texts, reverse_texts, source: str) -> pa.Table:
    if not (len(ref) == len(tgt) == len(texts) == len(reverse_texts)):
        raise ValueError("ref, tgt, texts and reverse_texts must have equal length")
    return pa.table({
        "ref_feat": feature_array(ref), "tgt_feat": feature_array(tgt),
        "text": pa.array(texts, pa.string()), "reverse_text": pa.array(reverse_texts, pa.string()),
        "source": pa.array([source] * len(texts), pa.string()),
    })


def check_encoder(table_schema: pa.Schema, vision_model: str, where: str) -> None:
    model, _ = schemas.embeddings_metadata(table_schema)
    if model != vision_model:
        raise ValueError(
            f"{where} holds embeddings of {model!r} but the composer's vision tower is "
            f"{vision_model!r}; re-run the synth job with --model {vision_model} or change model.vision")


def _embedding_lookup(folder: Path, vision_model: str):
    table = read_table(folder)
    check_encoder(table.schema, vision_model, str(folder))
    ids = table.column("image_id").to_pylist()
    return {i: n for n, i in enumerate(ids)}, feature_matrix(table.column("embedding"))


def synth_triplets(synth_dir: str | Path, vision_model: str, limit: int | None = None) -> pa.Table:
    """Training examples from a synth job's output folder (triplets + embeddings)."""
    synth_dir = Path(synth_dir)
    for stage in ("triplets", "embeddings"):
        if not (synth_dir / stage / "_SUCCESS.json").is_file():
            raise FileNotFoundError(f"{synth_dir / stage} is not a finished synth table; run jobs/synth.py first")
    index, vectors = _embedding_lookup(synth_dir / "embeddings", vision_model)
    triplets = read_table(synth_dir / "triplets").sort_by("triplet_id")
    if limit:
        triplets = triplets.slice(0, limit)
    ref = np.array([index[i] for i in triplets.column("ref_id").to_pylist()])
    tgt = np.array([index[i] for i in triplets.column("tgt_id").to_pylist()])
    return examples_table(vectors[ref], vectors[tgt], triplets.column("text").to_pylist(),
                          triplets.column("reverse_text").to_pylist(), "synth")


def slerp_triplets(synth_dir: str | Path, vision_model: str, alpha: float = 0.5,
                   synthetic_share: float = 0.75, seed: int = 0, limit: int | None = None) -> pa.Table:
    """CoLLM's triplets from a corpus (captions) and its embeddings, no pairs needed.

    For image t with nearest neighbour n: reference = slerp(e_t, e_n, alpha), target = e_t.
    With probability `synthetic_share` the text is the template modification text from
    n's caption to t's caption (what changes from the neighbour), else t's caption.
    """
    from cir.data.corpus import read_captions
    from cir.generate.template import template_texts
    from cir.mining import knn
    from cir.outputs import parquet_files

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"slerp alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= synthetic_share <= 1.0:
        raise ValueError(f"synthetic_share must be in [0, 1], got {synthetic_share}")
    synth_dir = Path(synth_dir)
    index, vectors = _embedding_lookup(synth_dir / "embeddings", vision_model)
    ids = list(index)
    corpus_files = [str(f) for f in parquet_files(synth_dir / "corpus")]
    if not corpus_files:
        raise FileNotFoundError(f"{synth_dir / 'corpus'} holds no corpus table (captions are needed)")
    caps = read_captions(corpus_files)
    caption_of = dict(zip(caps.column("image_id").to_pylist(), caps.column("caption").to_pylist()))
    _, nn = knn(vectors, 1)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))[: limit or len(ids)]
    pairs, texts, reverses = [], [], []
    for t in order:
        n = int(nn[t, 0])
        cap_t, cap_n = caption_of.get(ids[t]), caption_of.get(ids[n])
        if n < 0 or not cap_t or not cap_n or cap_t == cap_n:
            continue
        if rng.random() < synthetic_share:
            forward, reverse, _ = template_texts(cap_n, cap_t)
        else:
            forward, reverse = cap_t, cap_n
        pairs.append((t, n))
        texts.append(forward)
        reverses.append(reverse)
    if not texts:
        raise ValueError(f"no Slerp triplets could be made from {synth_dir} (captions missing?)")
    import torch

    from cir.losses import slerp

    t_idx, n_idx = map(np.array, zip(*pairs))
    ref = slerp(torch.from_numpy(vectors[t_idx]), torch.from_numpy(vectors[n_idx]), alpha).numpy()
    return examples_table(ref, vectors[t_idx], texts, reverses, "slerp")


def vision_encoder(vision_model: str, seed: int = 0):
    """The composer's vision tower as a `ClipEncoder`; weights a built-in config does not
    load are initialised from `seed` (as `cir.baselines` does), the global RNG untouched."""
    from cir.encoders import ClipEncoder, seeded_init

    with seeded_init(seed):
        return ClipEncoder(vision_model)


def encode_images(image_bytes: list[bytes], vision_model: str, batch_size: int = 256) -> np.ndarray:
    """Pooled, normalised embeddings of encoded images with the composer's vision tower."""
    from cir.encoders import decode_image

    encoder = vision_encoder(vision_model)
    out = [encoder.encode_images([decode_image(b) for b in image_bytes[i:i + batch_size]])
           for i in range(0, len(image_bytes), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


class ShapesSplit(NamedTuple):
    gallery: pa.Table      # image_id, image, caption, category
    queries: pa.Table      # ref_id, tgt_id, text, reverse_text, ...
    feats: np.ndarray      # [n_gallery, d] pooled embeddings of the gallery, in its order
    ref: np.ndarray        # each query's reference, as a gallery row
    tgt: np.ndarray        # each query's target, as a gallery row


def shapes_split(root: str | Path, vision_model: str, split: str, limit: int | None = None) -> ShapesSplit:
    """A shapes benchmark split with its gallery encoded once (first `limit` queries)."""
    from cir.data.shapes_corpus import read_benchmark_split

    gallery, queries = read_benchmark_split(root, split)
    if limit:
        queries = queries.slice(0, limit)
    index = {i: n for n, i in enumerate(gallery.column("image_id").to_pylist())}

    def rows(column: str) -> np.ndarray:
        return np.array([index[i] for i in queries.column(column).to_pylist()])

    return ShapesSplit(gallery, queries, encode_images(gallery.column("image").to_pylist(), vision_model),
                       rows("ref_id"), rows("tgt_id"))


def benchmark_triplets(root: str | Path, vision_model: str, split: str = "train",
                       limit: int | None = None) -> pa.Table:
    """Training examples from the shapes benchmark's annotated split."""
    s = shapes_split(root, vision_model, split, limit)
    return examples_table(s.feats[s.ref], s.feats[s.tgt], s.queries.column("text").to_pylist(),
                          s.queries.column("reverse_text").to_pylist(), f"benchmark:{split}")


def _encode_benchmark_images(images: dict, vision_model: str, batch_size: int = 256):
    """Encode {image id: Benchmark that can read it}, streaming (a CIRR train split is ~17k
    images). Returns ({id: row}, [n, d] vectors, {id: why it could not be read})."""
    from cir.encoders import decode_image
    from cir.progress import log

    encoder = vision_encoder(vision_model)
    index: dict[str, int] = {}
    chunks, failed, batch_ids, batch = [], {}, [], []

    def flush():
        if batch:
            chunks.append(encoder.encode_images(batch))
            index.update((i, len(index)) for i in batch_ids)
            batch_ids.clear()
            batch.clear()
            if len(chunks) % 20 == 0:
                log(f"encoded {len(index)} / {len(images)} images")

    for image_id, bench in images.items():
        try:
            image = decode_image(bench.image_bytes(image_id))
        except (OSError, ValueError) as exc:  # missing file (FileNotFoundError) or unreadable
            failed[image_id] = str(exc)
            continue
        batch_ids.append(image_id)
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    flush()
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return index, vectors, failed


def reader_triplets(benches, vision_model: str, limit: int | None = None,
                    batch_size: int = 256) -> pa.Table:
    """Training examples from one or more loaded `cir.benchmarks.Benchmark` splits
    (e.g. the three FashionIQ categories), in order; `limit` caps the total queries.

    Target: each query's first target id (CIRR's target_hard). No reverse texts.
    Images that are missing or unreadable are skipped with their queries (a warning
    names a few); an error if no query is left. Queries without targets are an error.
    """
    from cir.benchmarks import Benchmark
    from cir.progress import log

    if not isinstance(benches, Benchmark):  # a list, or load_fashioniq_all's dict
        benches = list(benches.values() if isinstance(benches, dict) else benches)
    else:
        benches = [benches]
    picked, users = [], {}
    for bench in benches:
        no_target = [q.query_id for q in bench.queries if not q.target_ids]
        if no_target:
            raise ValueError(
                f"{bench.name} {bench.split}: {len(no_target)} of {len(bench.queries)} queries have no "
                f"target (withheld ground truth, e.g. {no_target[:3]}); training needs a split with targets")
        if bench.image_source is None and (bench.image_dir is None or not bench.image_dir.is_dir()):
            raise FileNotFoundError(f"{bench.name} {bench.split}: image folder {bench.image_dir} "
                                    "does not exist (data.images)")
        queries = bench.queries[: max(limit - len(picked), 0)] if limit else bench.queries
        for q in queries:
            picked.append((bench, q))
            for image_id in (q.ref_id, q.target_ids[0]):
                users.setdefault(image_id, bench)
    if not picked:
        raise ValueError(f"no queries in {', '.join(f'{b.name} {b.split}' for b in benches)}")
    index, vectors, failed = _encode_benchmark_images(users, vision_model, batch_size)
    kept = [(b, q) for b, q in picked if q.ref_id in index and q.target_ids[0] in index]
    if failed:
        examples = "; ".join(f"{i}: {why}" for i, why in list(failed.items())[:5])
        message = (f"{len(failed)} of {len(users)} images could not be read, so {len(picked) - len(kept)} "
                   f"of {len(picked)} queries are left out (first: {examples})")
        if not kept:
            raise FileNotFoundError(message + "; no training example is left (check data.images)")
        log("WARNING: " + message)
    tables = []
    for bench in benches:
        rows = [q for b, q in kept if b is bench]
        if rows:
            ref = vectors[[index[q.ref_id] for q in rows]]
            tgt = vectors[[index[q.target_ids[0]] for q in rows]]
            tables.append(examples_table(ref, tgt, [q.text for q in rows], [None] * len(rows),
                                         f"{bench.name}:{bench.split}"))
    return pa.concat_tables(tables)
