"""An eval run's outputs: metrics.json, predictions and submission files, a text table."""
from __future__ import annotations

import time
from typing import Mapping

from cir.benchmarks.base import Benchmark
from cir.evaluation.score import EvalResult


def write_outputs(result: EvalResult, benches: Mapping[str, Benchmark], out_dir,
                  config: dict | None = None) -> dict[str, str]:
    """Write predictions (model mode), submission files (test splits without ground
    truth: CIRR both files, CIRCO one), and metrics.json last, each atomically, into
    `out_dir` (a local folder or a `cir.storage` URI / location).
    Returns {what: path} of the files written."""
    from cir.outputs import write_json_atomic
    from cir.storage import resolve
    from cir.submission import write_circo_submission, write_cirr_submission

    out_dir = resolve(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    by_name = {r.name: r for r in result.results}
    if result.mode == "model":
        preds = {k: v for r in result.results for k, v in r.predictions.items()}
        # compact, in query order: these files can be large (CIRR: 4k queries x 50 ids)
        files["predictions"] = str(write_json_atomic(out_dir / "predictions.json", preds,
                                                     indent=None, sort_keys=False))
        subset = {k: v for r in result.results for k, v in (r.subset_predictions or {}).items()}
        if subset:
            files["subset_predictions"] = str(write_json_atomic(out_dir / "predictions_subset.json", subset,
                                                                indent=None, sort_keys=False))
    for name, bench in benches.items():
        r = by_name[name]
        if bench.has_targets:
            continue
        if bench.protocol == "cirr":
            main, sub = write_cirr_submission(bench, r.predictions, r.subset_predictions,
                                              out_dir / f"submission_{name}_{bench.split}_recall.json",
                                              out_dir / f"submission_{name}_{bench.split}_recall_subset.json")
            files["submission_recall"], files["submission_recall_subset"] = str(main), str(sub)
        elif bench.protocol == "circo":
            files["submission"] = str(write_circo_submission(
                bench, r.predictions, out_dir / f"submission_{name}_{bench.split}.json"))
    doc = {
        "benchmark": result.benchmark, "split": result.split, "mode": result.mode,
        "model": result.model, "encoder": result.encoder,
        "counts": {r.name: {"queries": r.queries, "gallery": r.gallery} for r in result.results},
        "metrics": result.metrics,
        "per_benchmark": {r.name: r.metrics for r in result.results} if len(result.results) > 1 else None,
        "time": {k: round(v, 3) for k, v in result.seconds.items()},
        "info": result.info, "files": files, "config": config,
        "benchmark_meta": {n: {k: v for k, v in b.meta.items() if k not in ("captions", "manifest")}
                           for n, b in benches.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    files["metrics"] = str(out_dir / "metrics.json")
    write_json_atomic(out_dir / "metrics.json", doc)
    return files


def format_table(result: EvalResult) -> str:
    """The metrics as a text table (one column per benchmark, plus FashionIQ's mean)."""
    head = (f"{result.benchmark} {result.split}  "
            + (f"model {result.model}" + (f" ({result.encoder})" if result.encoder else "")
               if result.mode == "model" else f"predictions {result.info.get('predictions')}"))
    counts = ", ".join(f"{r.name}: {r.queries} queries, {r.gallery} gallery" for r in result.results)
    lines = [head, counts]
    scored = [r for r in result.results if r.metrics is not None]
    if not scored:
        lines.append("no ground truth on this split: rankings / submission files written, no metrics")
        return "\n".join(lines)
    cols = [(r.name, r.metrics) for r in scored]
    if len(scored) > 1 and result.metrics:
        cols.append(("mean", {k: v for k, v in result.metrics.items() if "/" not in k}))
    keys = [k for k in result.metrics or scored[0].metrics if "/" not in k] if len(cols) > 1 \
        else list(scored[0].metrics)
    width = max(len(k) for k in keys) + 2
    lines.append(f"{'metric':<{width}}" + "".join(f"{n:>18}" for n, _ in cols))
    for key in keys:
        lines.append(f"{key:<{width}}" + "".join(
            f"{m[key]:>18.4f}" if key in m else f"{'-':>18}" for _, m in cols))
    return "\n".join(lines)
