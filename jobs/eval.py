"""Evaluate a CIR query encoder on a benchmark, or score a predictions file.

    python jobs/eval.py --benchmark shapes --model baseline:sum     # embedded default
    python jobs/eval.py --benchmark shapes --split test --model baseline:image-only --encoder cir-tiny --output DIR
    python jobs/eval.py --benchmark cirr --split val --annotations CIRR_DIR --images CIRR_IMAGES --model baseline:sum
    python jobs/eval.py --benchmark fashioniq --annotations FIQ_DIR --images FIQ_IMAGES --model checkpoint:PATH
    python jobs/eval.py --benchmark circo --split val --annotations CIRCO_DIR --predictions submission_val.json
    python jobs/eval.py --config configs/eval/cirr.yaml --set encode.num_actors=4
    ray job submit --working-dir . -- python jobs/eval.py --config configs/eval/shapes.yaml

Model mode encodes the gallery and the queries with Ray Data (an actor pool holding the
query encoder), ranks, and writes OUTPUT/metrics.json and OUTPUT/predictions.json; on
test splits without ground truth it writes the server submission files instead of
metrics (CIRR: recall + recall_subset; CIRCO). With --predictions nothing is encoded
and Ray is not started: the ranked ids in the file are scored (or checked and written
as submission files). The shapes benchmark is written into outputs/shapes-benchmark on
first use unless --data names one. See cir/evaluation/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir.config import load_config, parse_override  # noqa: E402
from cir.evaluation import EvalConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (e.g. configs/eval/cirr.yaml); default: built-in defaults")
    p.add_argument("--benchmark", help="shapes | cirr | fashioniq | fashioniq-<category> | circo")
    p.add_argument("--split", help="split (default: shapes test, others val; CIRR test: test1)")
    p.add_argument("--model", help="baseline:image-only | baseline:text-only | baseline:sum | checkpoint:PATH")
    p.add_argument("--encoder", help="open_clip encoder of the baselines (e.g. cir-tiny, ViT-L-14/openai)")
    p.add_argument("--annotations", help="annotation folder of cirr / fashioniq / circo")
    p.add_argument("--images", help="image folder of cirr / fashioniq / circo (model mode)")
    p.add_argument("--data", help="shapes benchmark folder (default: outputs/shapes-benchmark, written on first use)")
    p.add_argument("--predictions", help="score this JSON of ranked ids per query instead of running a model")
    p.add_argument("--subset-predictions", help="CIRR recall_subset file beside --predictions")
    p.add_argument("--output", help="output folder or URI (default: outputs/eval/<benchmark>-<split>-<model>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set encode.num_actors=2 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    return p.parse_args(argv)


FLAGS = ("benchmark", "split", "model", "encoder", "annotations", "images", "data", "predictions",
         "subset_predictions", "output")


def build_config(args) -> EvalConfig:
    overrides = [parse_override(o) for o in args.overrides]
    for flag in FLAGS:
        if getattr(args, flag) is not None:
            overrides.append((flag, getattr(args, flag)))
    return load_config(EvalConfig, args.config, overrides)


def _message(exc: Exception) -> str:
    # str(KeyError) quotes its message; show it as written.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = build_config(args)
        from cir import evaluation

        benches = evaluation.prepare(cfg)  # config, model spec, annotations, images: before Ray
        t_prepare = time.perf_counter() - t0
        if cfg.mode == "predictions":
            result = evaluation.evaluate_prediction_files(cfg, benches)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as exc:
        print(f"eval: error: {_message(exc)}", file=sys.stderr)
        return 2
    try:
        if cfg.mode == "model":
            from cir.raycluster import init_ray

            t1 = time.perf_counter()
            init_ray(args.address)
            t_ray = time.perf_counter() - t1
            result = evaluation.evaluate_model(cfg, benches)
            result.seconds = {"prepare": t_prepare, "ray_init": t_ray, **result.seconds}
        else:
            result.seconds = {"prepare": t_prepare, **result.seconds}
        result.seconds["wall"] = time.perf_counter() - t0
        out = cfg.output_dir()
        files = evaluation.write_outputs(result, benches, out, evaluation.config_dict(cfg))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"eval: error: {_message(exc)}", file=sys.stderr)
        return 1
    for warning in result.info.get("warnings", ()):
        print(f"eval: warning: {warning}", file=sys.stderr)
    print()
    print(evaluation.format_table(result))
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"\ntime: {times}")
    for what, path in files.items():
        print(f"{what:<25} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
