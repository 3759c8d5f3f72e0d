"""Retrieval against the number of synthetic pretraining triplets: a table and a plot.

    python jobs/scaling.py --config configs/scaling/shapes.yaml

The config names series of points, each a synth output (its triplets are counted) and
the eval folders of the runs pretrained on it, one per finetune seed; the config's
comments list the commands that make them. Prints a Markdown table (mean ± sd over the
seeds) and writes the plot (`plot:`). Reads only what the jobs wrote: no model, no Ray.
See cir/evaluation/scaling.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.config import load_config, parse_override  # noqa: E402
from cir.evaluation.scaling import (ScalingConfig, markdown_table, plot_scaling, reference_rows,  # noqa: E402
                                    scaling_rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="scaling config, e.g. configs/scaling/shapes.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config value (repeatable)")
    args = p.parse_args(argv)
    cfg = load_config(ScalingConfig, args.config, [parse_override(s) for s in args.set])
    rows, references = scaling_rows(cfg), reference_rows(cfg)
    print(markdown_table(references + rows, cfg.metrics))
    print(f"\nplot: {plot_scaling(rows, cfg.metrics, cfg.plot, cfg.title, references)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
