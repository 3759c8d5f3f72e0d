"""How far a composer could go on the shapes benchmark with a given encoder: oracles
that know the captions, next to image-only retrieval (see cir/evaluation/ceiling.py).

    python jobs/shapes_ceiling.py --encoder cir-shapes --split test
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="cir-shapes", help="open_clip name or alias (default cir-shapes)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--benchmark-dir", default=None,
                   help="a shapes benchmark folder (default outputs/shapes-benchmark, written on first use)")
    args = p.parse_args(argv)

    from cir.benchmarks import load_shapes
    from cir.benchmarks.shapes import shapes_benchmark_root
    from cir.evaluation.ceiling import caption_oracles

    bench = load_shapes(args.split, shapes_benchmark_root(args.benchmark_dir))
    print(json.dumps({"encoder": args.encoder, "split": args.split, "queries": len(bench.queries),
                      "gallery": len(bench.gallery_ids), "recall": caption_oracles(bench, args.encoder)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
