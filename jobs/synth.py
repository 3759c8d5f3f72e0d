"""Make CIR training triplets from an image collection.

    python jobs/synth.py                                   # embedded default: shapes world
    python jobs/synth.py --corpus path/to/images --output outputs/mine
    python jobs/synth.py --config configs/synth/shapes_llm.yaml   # SmolLM2 writes the texts
    ray job submit --working-dir . -- python jobs/synth.py --config configs/synth/cirr_vllm.yaml

Stages (each a table folder under --output; a rerun resumes): corpus -> embeddings
(Ray Data, CLIP actor pool) -> pairs (FAISS kNN in a similarity band) -> triplets
(a text-generation backend: template, or an LLM through hf / http / vllm, then the
quality filter). See cir/synth/pipeline.py and the README's synth section.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.config import load_config, parse_override  # noqa: E402
from cir.synth.config import SynthConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "local.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/local.yaml)")
    p.add_argument("--corpus", help="'shapes', an image folder, or a Parquet corpus (overrides corpus.source)")
    p.add_argument("--output", help="output folder or URI: s3://bucket/run, gs://bucket/run, file:///mnt/x "
                                    "(overrides output)")
    p.add_argument("--model", help="encoder model, e.g. cir-tiny, ViT-B-32, ViT-L-14/openai")
    p.add_argument("--backend", help="text-generation backend (overrides generate.backend)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set mine.band='[0.8, 0.97]' (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    return p.parse_args(argv)


def build_config(args) -> SynthConfig:
    overrides = [parse_override(o) for o in args.overrides]
    for flag, key in [("corpus", "corpus.source"), ("output", "output"),
                      ("model", "encode.model"), ("backend", "generate.backend")]:
        if getattr(args, flag) is not None:
            overrides.append((key, getattr(args, flag)))
    return load_config(SynthConfig, args.config, overrides)


def print_summary(summary, seconds: float) -> None:
    print(f"\nsynth finished in {seconds:.1f}s; outputs in {summary.output}")
    print(f"{'stage':<11} {'rows':>9} {'seconds':>9} {'rows/s':>9}  status   path")
    for name, r in summary.stages.items():
        status = "reused" if r.skipped else "done"
        rate = f"{r.rows_per_s:9.1f}" if r.seconds > 0 else f"{'-':>9}"
        print(f"{name:<11} {r.rows:>9} {r.seconds:>9.1f} {rate}  {status:<8} {r.path}")
    counts = summary.stages["triplets"].extra.get("filter")
    if counts and counts.get("dropped") is not None:
        dropped = ", ".join(f"{reason} {n}" for reason, n in counts["dropped"].items()) or "none"
        print(f"\nfilter: {counts['kept']} of {counts['candidates']} generated texts kept; dropped: {dropped}"
              f"{' (see ' + summary.rejected + ')' if counts['dropped'] else ''}; "
              f"{counts['kept_without_reverse_text']} kept without a reverse text")
    if summary.bad_images:
        print(f"\n{len(summary.bad_images)} unreadable file(s) skipped:")
        for row in summary.bad_images:
            print(f"  {row['image_id']}: {row['error']}")
    else:
        print("\nno unreadable files")


def main(argv=None) -> int:
    import time

    args = parse_args(argv)
    try:
        cfg = build_config(args)
        from cir.synth.pipeline import SynthRun

        run = SynthRun(cfg)  # validates config and corpus before Ray starts
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 2
    from cir.actor_pool import ActorCrashLoop
    from cir.raycluster import init_ray

    t0 = time.perf_counter()
    init_ray(args.address)
    try:
        summary = run.run()
    except (ValueError, ActorCrashLoop) as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
