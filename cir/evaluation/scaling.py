"""Retrieval against the amount of synthetic pretraining data: one table, one plot.

A scaling config names series (e.g. `template` and `mtst` texts) and, for each, points:
the synth output a run pretrained on (its triplet count is read from the table, so the
x axis is what training really saw) and the eval folders of that run's finetune seeds
(`jobs/eval.py --output`). Each point is the mean over its seeds, with their spread.
Nothing here trains or evaluates: it reads what the jobs wrote (`jobs/scaling.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cir.outputs import atomic_path, count_rows, parquet_files
from cir.submission import read_json_object


@dataclass
class ScalingPoint:
    synth_dir: str                      # the synth job's output; its triplets are counted
    evals: list[str] = field(default_factory=list)   # eval folders, one per finetune seed


@dataclass
class ScalingConfig:
    series: dict[str, list[ScalingPoint]] = field(default_factory=dict)
    # Runs without synthetic data (e.g. the annotated-only run A): {label: eval folders},
    # drawn as a level line.
    references: dict[str, list[str]] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["recall@1", "recall@10"])
    plot: str = "docs/scaling.png"
    title: str = "pretraining triplets vs. retrieval"


def count_triplets(synth_dir: str | Path) -> int:
    folder = Path(synth_dir) / "triplets"
    if not folder.is_dir() or not parquet_files(folder):
        raise FileNotFoundError(f"{folder}: no triplets table (run jobs/synth.py for it first)")
    return count_rows(folder)


def read_recalls(eval_dir: str | Path) -> dict[str, float]:
    path = Path(eval_dir) / "metrics.json"
    metrics = read_json_object(path, "metrics.json of jobs/eval.py", "with a 'metrics' object").get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: no 'metrics' object")
    return metrics


def mean_recalls(evals: list[str], metrics: list[str], where: str) -> dict[str, tuple[float, float]]:
    """{metric: (mean, sd)} over the eval folders (sd 0 for one)."""
    if not evals:
        raise ValueError(f"{where}: no eval folders")
    recalls = [read_recalls(e) for e in evals]
    out = {}
    for metric in metrics:
        missing = [e for e, r in zip(evals, recalls) if metric not in r]
        if missing:
            raise ValueError(f"{missing[0]}: no {metric} in metrics.json")
        values = np.array([r[metric] for r in recalls], dtype=np.float64)
        out[metric] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return out


def reference_rows(cfg: ScalingConfig) -> list[dict]:
    return [{"series": label, "seeds": len(evals), **mean_recalls(evals, cfg.metrics, f"reference {label!r}")}
            for label, evals in cfg.references.items()]


def scaling_rows(cfg: ScalingConfig) -> list[dict]:
    """One row per point: series, triplets, seeds and, per metric, mean and sd over the
    seeds (sd 0 for a single seed)."""
    rows = []
    for name, points in cfg.series.items():
        for point in points:
            recalls = mean_recalls(point.evals, cfg.metrics, f"series {name!r}, {point.synth_dir}")
            rows.append({"series": name, "triplets": count_triplets(point.synth_dir), "seeds": len(point.evals),
                         **recalls})
    return sorted(rows, key=lambda r: (r["series"], r["triplets"]))


def markdown_table(rows: list[dict], metrics: list[str]) -> str:
    head = ["series", "pretraining triplets", "seeds", *(m.replace("recall@", "R@") for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: | ---: |" + " ---: |" * len(metrics)]
    for r in rows:
        cells = [r["series"], f"{r['triplets']:,}" if "triplets" in r else "0", str(r["seeds"])]
        cells += [f"{r[m][0]:.1f} ± {r[m][1]:.1f}" if r["seeds"] > 1 else f"{r[m][0]:.1f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scaling(rows: list[dict], metrics: list[str], path: str | Path, title: str,
                 references: list[dict] = ()) -> Path:
    """One panel per metric, a line per series on a log x axis, seeds' sd as error bars;
    each reference a dashed level line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for series in dict.fromkeys(r["series"] for r in rows):
            pts = [r for r in rows if r["series"] == series]
            ax.errorbar([p["triplets"] for p in pts], [p[metric][0] for p in pts],
                        yerr=[p[metric][1] for p in pts], marker="o", capsize=3, label=series)
        for ref, style in zip(references, ("--", ":", "-.")):
            ax.axhline(ref[metric][0], color="grey", linestyle=style, label=ref["series"])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("synthetic pretraining triplets")
        ax.set_ylabel(metric.replace("recall@", "R@") + " (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
