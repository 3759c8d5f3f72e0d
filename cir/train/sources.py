"""Triplet sources for composer training, as one table of training examples.

Every source yields the same columns: `ref_feat` and `tgt_feat` (pooled image
embeddings of the composer's frozen vision tower, fixed_size_list<float32>[d]),
`text`, `reverse_text` (the target -> reference text, for PTHA; may be null) and
`source`. With the vision tower frozen its output is a pure function of the image,
so each image is encoded once, by Ray Data, into an embeddings table (the synth job's
`embeddings` stage, or the run's feature cache, `cir.train.features`), not per step.

* `synth_triplets`: the triplets table of `jobs/synth.py` joined with its embeddings.
* `slerp_triplets`: CoLLM's on-the-fly triplets from a corpus and its embeddings:
  the reference embedding is a Slerp between an image's embedding and its nearest
  neighbour's, the text comes from caption templates (`synthetic_share` of samples)
  or is the target's own caption.
* `benchmark_triplets`: the annotated train split of any `cir.benchmarks` reader
  (shapes, CIRR, FashionIQ): each image its queries use is encoded once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from cir import schemas
from cir.embed import EmbedSettings, read_embeddings
from cir.outputs import read_table
from cir.storage import refs, resolve

EXAMPLE_COLUMNS = ("ref_feat", "tgt_feat", "text", "reverse_text", "source")


def examples_table(ref: np.ndarray, tgt: np.ndarray, texts, reverse_texts, source: str) -> pa.Table:
    if not (len(ref) == len(tgt) == len(texts) == len(reverse_texts)):
        raise ValueError("ref, tgt, texts and reverse_texts must have equal length")
    return pa.table({
        "ref_feat": schemas.embedding_array(ref), "tgt_feat": schemas.embedding_array(tgt),
        "text": pa.array(texts, pa.string()), "reverse_text": pa.array(reverse_texts, pa.string()),
        "source": pa.array([source] * len(texts), pa.string()),
    })


def synth_embeddings(folder: Path, vision_model: str):
    """The synth job's embeddings table, checked to be of the composer's vision tower."""
    from cir.encoders import parse_encoder_name

    emb = read_embeddings(folder)
    if emb.model != str(parse_encoder_name(vision_model)):
        raise ValueError(
            f"{folder} holds embeddings of {emb.model!r} but the composer's vision tower is "
            f"{vision_model!r}; re-run the synth job with --model {vision_model} or change model.vision")
    return emb


def synth_triplets(synth_dir: str | Path, vision_model: str, limit: int | None = None) -> pa.Table:
    """Training examples from a synth job's output (triplets + embeddings): a folder, or a
    URI the synth job wrote to (`cir.storage`)."""
    synth_dir = resolve(synth_dir)
    for stage in ("triplets", "embeddings"):
        if not (synth_dir / stage / "_SUCCESS.json").is_file():
            raise FileNotFoundError(f"{synth_dir / stage} is not a finished synth table; run jobs/synth.py first")
    emb = synth_embeddings(synth_dir / "embeddings", vision_model)
    index = emb.index()
    triplets = read_table(synth_dir / "triplets").sort_by("triplet_id")
    if limit:
        triplets = triplets.slice(0, limit)
    ref = np.array([index[i] for i in triplets.column("ref_id").to_pylist()])
    tgt = np.array([index[i] for i in triplets.column("tgt_id").to_pylist()])
    return examples_table(emb.vectors[ref], emb.vectors[tgt], triplets.column("text").to_pylist(),
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
    synth_dir = resolve(synth_dir)
    emb = synth_embeddings(synth_dir / "embeddings", vision_model)
    ids, vectors = list(emb.ids), emb.vectors
    corpus_files = refs(parquet_files(synth_dir / "corpus"))
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


def _pick_queries(benches, limit: int | None) -> list:
    """(benchmark, query) in order, the first `limit` overall; every query needs a target."""
    picked = []
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
        picked += [(bench, q) for q in queries]
    if not picked:
        raise ValueError(f"no queries in {', '.join(f'{b.name} {b.split}' for b in benches)}")
    return picked


def benchmark_triplets(benches, vision_model: str, cache_root: str | Path,
                       settings: EmbedSettings | None = None, limit: int | None = None) -> pa.Table:
    """Training examples from loaded `cir.benchmarks.Benchmark` train splits (one, or
    e.g. the three FashionIQ categories), in order; `limit` caps the total queries.

    Target: each query's first target id (CIRR's target_hard); reverse text: the
    query's own when the benchmark has one (shapes). Images are encoded into the
    feature cache under `cache_root`; those missing or unreadable are skipped with
    their queries (a warning names a few), and no query left is an error.
    """
    from cir.benchmarks import Benchmark
    from cir.progress import log
    from cir.train.features import benchmark_features

    benches = [benches] if isinstance(benches, Benchmark) else list(benches)
    picked = _pick_queries(benches, limit)
    features, n_images, failed = {}, 0, {}
    for bench in benches:
        used = [i for b, q in picked if b is bench for i in (q.ref_id, q.target_ids[0])]
        if used:
            features[id(bench)] = f = benchmark_features(bench, used, vision_model, cache_root, settings)
            n_images += len(set(used))
            failed.update(f.failed)
    kept = [(b, q) for b, q in picked
            if q.ref_id in features[id(b)].index and q.target_ids[0] in features[id(b)].index]
    if failed:
        examples = "; ".join(f"{i}: {why}" for i, why in list(failed.items())[:5])
        message = (f"{len(failed)} of {n_images} images could not be read, so {len(picked) - len(kept)} "
                   f"of {len(picked)} queries are left out (first: {examples})")
        if not kept:
            raise FileNotFoundError(message + "; no training example is left (check data.images)")
        log("WARNING: " + message)
    tables = []
    for bench in benches:
        rows = [q for b, q in kept if b is bench]
        if rows:
            f = features[id(bench)]
            ref = f.vectors[[f.index[q.ref_id] for q in rows]]
            tgt = f.vectors[[f.index[q.target_ids[0]] for q in rows]]
            tables.append(examples_table(ref, tgt, [q.text for q in rows],
                                         [q.meta.get("reverse_text") for q in rows], f"{bench.name}:{bench.split}"))
    return pa.concat_tables(tables)
