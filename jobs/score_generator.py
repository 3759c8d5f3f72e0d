"""Score the MTST text generator and the captioner on the shapes world with the exact
checker (cir/generate/score.py): modification texts for a stable sample of mined pairs
of a synth output, beside the `template` backend and the most common annotated text;
captions of corpus images beside the most common caption.

    python jobs/score_generator.py --pairs outputs/synth-pretrain \\
        --generator outputs/runs/shapes-generator/modification/export \\
        --captioner outputs/runs/shapes-captioner/caption/export --output outputs/eval/generator.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="outputs/synth-pretrain",
                   help="a synth output folder: its mined pairs are scored, its corpus gives images and captions")
    p.add_argument("--n", type=int, default=500, help="pairs (and captioned images) to score")
    p.add_argument("--generator", help="an export of jobs/train_generator.py trained for modification texts")
    p.add_argument("--prompt", default=None, help="the generator writes after this prompt (default: its "
                   "model.modification_prompt; a stage's data.prompt reads that stage's wording)")
    p.add_argument("--captioner", help="an export of jobs/train_generator.py trained for captions")
    p.add_argument("--benchmark-dir", default=None, help="the shapes benchmark whose train split gives the "
                   "trivial baseline's text (default: the built-in location)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--output", help="write the scores here as JSON (atomically)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    return p.parse_args(argv)


def trivial_texts(benchmark_dir: str | None) -> tuple[str, str]:
    """The most common forward and reverse texts of the shapes train split."""
    from cir.benchmarks import load_benchmark
    from cir.benchmarks.shapes import DEFAULT_ROOT, shapes_benchmark_root
    from cir.generate.score import most_common

    bench = load_benchmark("shapes", "train", shapes_benchmark_root(benchmark_dir or DEFAULT_ROOT))
    return (most_common(q.text for q in bench.queries),
            most_common(q.meta.get("reverse_text") for q in bench.queries))


def print_table(scores: dict) -> None:
    from cir.generate.score import EDIT_BUCKETS

    first = next(iter(scores.values()))["forward"]["n"]
    print("\nexact-edit accuracy (%) by edits between the images: " +
          ", ".join(f"{b}: {first[b]} pairs" for b in EDIT_BUCKETS))
    print(f"{'texts':<32}{'direction':<10}{'all':>7}" + "".join(f"{b:>7}" for b in EDIT_BUCKETS))
    for name, by_dir in scores.items():
        for direction, s in by_dir.items():
            cells = "".join(f"{s[b]:7.1f}" if s[b] is not None else f"{'-':>7}" for b in EDIT_BUCKETS)
            print(f"{name:<32}{direction:<10}{s['all']:7.1f}{cells}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.generator and not args.captioner:
        print("score_generator: error: give --generator, --captioner or both", file=sys.stderr)
        return 2
    if args.n < 1:
        print("score_generator: error: --n must be >= 1", file=sys.stderr)
        return 2
    from cir.generate import score
    from cir.outputs import write_json_atomic
    from cir.raycluster import init_ray

    t0 = time.perf_counter()
    try:
        pairs, corpus = score.scored_pairs(args.pairs, args.n)
        trivial = trivial_texts(args.benchmark_dir)
    except (ValueError, FileNotFoundError) as exc:
        print(f"score_generator: error: {exc}", file=sys.stderr)
        return 2
    init_ray(args.address)
    result = {"pairs": str(Path(args.pairs).resolve()), "n_pairs": pairs.num_rows}
    if args.generator:
        methods = {
            f"generator ({Path(args.generator).parent.parent.name}/{Path(args.generator).parent.name})":
                score.generator_texts(args.generator, pairs, corpus, args.batch_size, args.num_actors,
                                      args.prompt),
            "template backend": score.template_texts_of(pairs),
            "most common train text": ([trivial[0]] * pairs.num_rows, [trivial[1]] * pairs.num_rows),
        }
        result["generator"] = str(Path(args.generator).resolve())
        result["prompt"] = args.prompt
        result["modification"] = score.score_modification(pairs, methods)
        print_table(result["modification"])
    if args.captioner:
        result["captioner"] = str(Path(args.captioner).resolve())
        result["caption"] = score.score_captions(args.captioner, corpus, args.n, args.batch_size, args.num_actors)
        c = result["caption"]
        print(f"\nexact-caption accuracy on {c['n']} images: captioner {c['captioner']:.1f}%, "
              f"most common caption {c['most common caption']:.1f}%")
    if args.output:
        write_json_atomic(args.output, result)
        print(f"scores: {args.output}")
    print(f"score_generator finished in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
