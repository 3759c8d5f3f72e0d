"""How far a composer could go on the shapes benchmark with a given encoder: oracles
that know the captions (ground truth a model never sees), next to image-only retrieval.

* oracle:target-caption: the target's exact caption through the text tower. What a
  composer reaches if it rewrites the reference's scene into the target's caption.
* oracle:caption-delta: reference image + (text(target caption) - text(reference
  caption)): a residual composer whose edit vector is exact. High recall here means the
  encoder's space is additive enough for a residual composer.
Each ranks the split's gallery with the reference excluded, as `jobs/eval.py` does. It
encodes in this process (a few thousand tiny images; no Ray), with the embedding
stage's own callable.
"""
from __future__ import annotations

import numpy as np

from cir.benchmarks.base import Benchmark


def caption_oracles(bench: Benchmark, encoder: str, ks=(1, 5, 10), batch_size: int = 256) -> dict:
    """{"image-only" | "oracle:target-caption" | "oracle:caption-delta": {"R@k": percent}}."""
    import pyarrow as pa

    from cir.baselines import l2_normalise
    from cir.embed import Embedder
    from cir.metrics import embedding_recall
    from cir.schemas import embedding_matrix

    embedder = Embedder(encoder)
    ids = bench.gallery_ids
    feats = np.concatenate([
        embedding_matrix(embedder(pa.table({"image_id": ids[i:i + batch_size],
                                            "image": [bench.image_bytes(g) for g in ids[i:i + batch_size]]}))
                         .column("embedding"))
        for i in range(0, len(ids), batch_size)])
    captions = embedder.model.encode_texts([bench.meta["captions"][g] for g in ids])
    ref, tgt = bench.reference_indices(), bench.target_indices()[:, 0]

    def recall(queries: np.ndarray) -> dict:
        r = embedding_recall(l2_normalise(queries), feats, tgt, ks, exclude=ref)
        return {f"R@{k}": round(v, 1) for k, v in r.items()}

    return {"image-only": recall(feats[ref]),
            "oracle:target-caption": recall(captions[tgt]),
            "oracle:caption-delta": recall(feats[ref] + captions[tgt] - captions[ref])}
