"""Build a sharded FAISS index over a gallery, for retrieval serving.

    python jobs/index.py                          # after `make synth`: its gallery, cir-shapes, 2 shards
    python jobs/index.py --gallery path/to/images --encoder checkpoint:outputs/runs/X/finetune/export
    ray job submit --working-dir . -- python jobs/index.py --gallery /mnt/shared/corpus --shards 8

Stages under --output (each committed atomically; a rerun resumes): embeddings (the
Ray Data embedding stage, through the encoder's gallery side) -> index (rows partitioned
by shard with Ray Data, the index trained once on a sample, one Ray task per shard adding
its rows; the type from the shard size and --set index.memory_budget_mb=...;
manifest.json with the encoder, dim, index type and checksums) -> gallery (captions,
categories, thumbnails and reference copies). See cir/index/. Serve the result with
`serve run serve/config.yaml`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.config import load_config, parse_override  # noqa: E402
from cir.index.job import IndexJobConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", help="a synth output, a Parquet corpus or an image folder (default: outputs/synth-local)")
    p.add_argument("--encoder", help="open_clip name or query-encoder spec (default: cir-shapes)")
    p.add_argument("--image-encoder", help="the image tower of a baseline:... encoder spec")
    p.add_argument("--output", help="output folder (default: outputs/index-local)")
    p.add_argument("--shards", type=int, help="index shards (default: 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set index.kind=ivf_flat (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    return p.parse_args(argv)


def build_config(args) -> IndexJobConfig:
    overrides = [parse_override(o) for o in args.overrides]
    for flag, key in [("gallery", "gallery"), ("encoder", "encoder"), ("image_encoder", "image_encoder"),
                      ("output", "output"), ("shards", "shards")]:
        if getattr(args, flag) is not None:
            overrides.append((key, getattr(args, flag)))
    return load_config(IndexJobConfig, None, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from cir.index.job import IndexRun

        run = IndexRun(build_config(args))      # checks the config and the gallery before Ray starts
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"index: error: {exc}", file=sys.stderr)
        return 2
    from cir.raycluster import init_ray

    init_ray(args.address)
    try:
        results = run.run()
    except ValueError as exc:
        print(f"index: error: {exc}", file=sys.stderr)
        return 1
    print(f"\nindex in {run.out.root}")
    for name, r in results.items():
        print(f"{name:<11} {r.get('rows', '-'):>9} rows  {'reused' if r['skipped'] else 'done':<7} {run.out.path(name)}")
    bad = results["embeddings"].get("bad_images", [])
    print(f"\n{len(bad)} unreadable file(s) skipped" if bad else "\nno unreadable files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
