"""Train the MTST text generator (a small vision-language model) on Ray Train: it
writes the modification text of an image pair, or the caption of an image.

    python jobs/train_generator.py --config configs/train/shapes_generator.yaml
    ray job submit --working-dir . -- python jobs/train_generator.py --config configs/train/shapes_generator.yaml

Stages run in order, each from the previous stage's export (e.g. `caption` on a
captioned corpus, then `modification` on the benchmark's annotated triplets), with the
composer job's DeepSpeed / DDP switch, checkpoints and resume (cir/train/generator_loop.py).
The export is what the synth job's `mtst` backend and `captions` step load.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.train.generator_config import GeneratorTrainConfig  # noqa: E402


def main(argv=None) -> int:
    from jobs.train import config_from_args, parse_args, stopped

    args = parse_args(argv, __doc__, "configs/train/shapes_generator.yaml")
    try:
        cfg = config_from_args(GeneratorTrainConfig, args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"train_generator: error: {exc}", file=sys.stderr)
        return 2
    from cir.raycluster import init_ray
    from cir.train.generator_loop import run_generator_training
    from cir.train.run import TrainingStopped, run_folder

    t0 = time.perf_counter()
    init_ray(args.address)
    try:
        export = run_generator_training(cfg)
    except TrainingStopped as exc:
        print(stopped(exc, "train_generator", argv), file=sys.stderr)
        return 1
    print(f"\ntrain_generator finished in {time.perf_counter() - t0:.1f}s; final model: {export}")
    for stage in cfg.stages:
        print(f"  {stage.name} ({stage.task}): {run_folder(cfg) / stage.name} (export/, history.json, curve.png)")
    print(f"write triplets with it: python jobs/synth.py --set generate.backend=mtst --set generate.mtst.model={export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
