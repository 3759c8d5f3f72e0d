"""Compare eval runs on one benchmark split: recall@k of each, and a paired bootstrap.

    python jobs/compare.py outputs/eval/shapes-test-A outputs/eval/shapes-test-B
    python jobs/compare.py RUN_A RUN_B RUN_C --k 1 5 10 --resamples 10000 --seed 0 --output cmp.json

Each RUN is an output folder of jobs/eval.py in model mode (metrics.json and
predictions.json). Every run after the first is compared with the first: the mean
difference in recall@k over the queries, in points, with its 95% interval from
resampling the queries (see cir/evaluation/compare.py). The benchmark is loaded from the
first run's config; no model, no Ray, no images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.evaluation.compare import compare_runs  # noqa: E402
from cir.outputs import write_json_atomic  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="EVAL_DIR", help="output folders of jobs/eval.py; the first is the baseline")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="cut-offs (default 1 5 10)")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--output", help="also write the result as JSON to this file")
    return p.parse_args(argv)


def format_result(result: dict) -> str:
    keys = [f"recall@{k}" for k in result["ks"]]
    lines = [f"{result['benchmark']} {result['split']}: {result['queries']} queries; paired bootstrap "
             f"over queries, {result['resamples']} resamples, seed {result['seed']}"]
    if result["note"]:
        lines.append(f"({result['note']})")
    for i, run in enumerate(result["runs"], 1):
        lines.append(f"run {i}: {run['folder']}" + (f" ({run['model']})" if run["model"] else ""))
    lines.append("")
    lines.append(f"{'':<8}" + "".join(f"{k:>24}" for k in keys))
    for i, run in enumerate(result["runs"], 1):
        lines.append(f"{f'run {i}':<8}" + "".join(f"{run['recall'][k]:>24.2f}" for k in keys))
    lines.append("\ndifference to run 1 in points, 95% interval:")
    for i, diff in enumerate(result["differences"], 2):
        cells = [f"{d['mean_diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" for d in (diff[k] for k in keys)]
        lines.append(f"{f'run {i}':<8}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        result = compare_runs(a.runs, a.k, a.resamples, a.seed)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"compare: error: {message}", file=sys.stderr)
        return 2
    print(format_result(result))
    if a.output:
        print(f"\nwritten to {write_json_atomic(a.output, result, sort_keys=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
