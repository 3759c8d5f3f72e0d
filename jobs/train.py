"""Train the composed-query encoder (LLM composer, LoRA) on Ray Train + DeepSpeed.

    python jobs/train.py --config configs/train/shapes_A.yaml
    ray job submit --working-dir . -- python jobs/train.py --config configs/train/shapes_B.yaml

Stages run in order, each from the previous stage's export (e.g. pretrain on synthetic
triplets, then finetune on the benchmark). Re-running with the same run name resumes
from the latest checkpoint; finished stages are skipped. A stage whose worker dies is
restarted from its latest checkpoint up to run.max_failures times (default 2); past that
the job stops (exit status 1) naming the failure and the checkpoint step a rerun of the
same command resumes from. See cir/train/run.py.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.config import load_config, parse_override  # noqa: E402
from cir.train.config import TrainConfig  # noqa: E402


def parse_args(argv=None, doc: str = __doc__, example: str = "configs/train/shapes_A.yaml"):
    """The flags of the training jobs (this one and jobs/train_generator.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
    p.add_argument("--name", help="run name (overrides run.name); same name = resume")
    p.add_argument("--storage", help="where runs live: a folder or a URI, s3://... gs://... (overrides run.storage)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set run.num_workers=4 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    return p.parse_args(argv)


def config_from_args(cls, args):
    """The job's validated config: the YAML file, then --set, --name and --storage."""
    overrides = [parse_override(o) for o in args.overrides]
    if args.name:
        overrides.append(("run.name", args.name))
    if args.storage:
        overrides.append(("run.storage", args.storage))
    cfg = load_config(cls, args.config, overrides)
    cfg.validate()
    return cfg


def stopped(exc, job: str, argv=None) -> str:
    """A training job's last words when a stage failed for good: the failure, where it
    stopped, and the command that resumes it."""
    command = shlex.join(["python", f"jobs/{job}.py", *(sys.argv[1:] if argv is None else argv)])
    return f"{job}: stopped: {exc}\nto resume: {command}"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(TrainConfig, args)
        from cir.train.run import check_run_settings

        check_run_settings(cfg)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    from cir.raycluster import init_ray
    from cir.train.run import TrainingStopped, run_folder, run_training

    t0 = time.perf_counter()
    init_ray(args.address)
    try:
        export = run_training(cfg)
    except TrainingStopped as exc:
        print(stopped(exc, "train", argv), file=sys.stderr)
        return 1
    run_dir = run_folder(cfg)
    print(f"\ntrain finished in {time.perf_counter() - t0:.1f}s; final model: {export}")
    for stage in cfg.stages:
        print(f"  {stage.name}: {run_dir / stage.name} (export/, history.json, curve.png)")
    print(f"evaluate with: python jobs/eval.py --benchmark shapes --model checkpoint:{export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
