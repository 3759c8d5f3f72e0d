"""How far a composer could go on the shapes benchmark with a given encoder: oracles
that know the captions (ground truth a model never sees), next to image-only retrieval.

    python jobs/shapes_ceiling.py --encoder cir-shapes --split test

* oracle:target-caption: the target's exact caption through the text tower. What a
  composer reaches if it rewrites the reference's scene into the target's caption.
* oracle:caption-delta: reference image + (text(target caption) - text(reference
  caption)): a residual composer whose edit vector is exact. High recall here means the
  encoder's space is additive enough for a residual composer.
Both rank the split's gallery with the reference excluded, as `jobs/eval.py` does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recall(queries: np.ndarray, gallery: np.ndarray, ref: np.ndarray, tgt: np.ndarray, ks=(1, 5, 10)) -> dict:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ gallery.T
    rows = np.arange(len(q))
    scores[rows, ref] = -np.inf
    rank = (scores > scores[rows, tgt][:, None]).sum(1)
    return {f"R@{k}": round(float((rank < k).mean() * 100), 1) for k in ks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="cir-shapes", help="open_clip name or alias (default cir-shapes)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--benchmark-dir", default="outputs/shapes-benchmark")
    args = p.parse_args(argv)

    from cir.train.run import shapes_benchmark_root
    from cir.train.sources import shapes_split, vision_encoder

    split = shapes_split(shapes_benchmark_root(args.benchmark_dir), args.encoder, args.split)
    images, ref, tgt = split.feats, split.ref, split.tgt
    captions = vision_encoder(args.encoder).encode_texts(split.gallery.column("caption").to_pylist())
    results = {
        "image-only": recall(images[ref], images, ref, tgt),
        "oracle:target-caption": recall(captions[tgt], images, ref, tgt),
        "oracle:caption-delta": recall(images[ref] + captions[tgt] - captions[ref], images, ref, tgt),
    }
    print(json.dumps({"encoder": args.encoder, "split": args.split, "queries": len(ref),
                      "gallery": len(images), "recall": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
