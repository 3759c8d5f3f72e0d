"""Train a small CLIP on the shapes world and report held-out retrieval figures.

    python jobs/train_clip.py --n-images 20000 --epochs 12 --lr 2e-3 \\
        --output cir/weights/cir-shapes.safetensors

Writes a shapes corpus (seed --corpus-seed, default 1000: not the 0/1 that the synth job
and the benchmark use) to a temporary folder, trains with `cir.clip_train`, saves the
weights (safetensors, fp16) and evaluates with `cir.clip_eval` (see there):

* on --eval-n fresh scenes (seed --eval-seed) never seen in training: text->image and
  image->text Recall@1/5, and the cosine between two renders of the same scene;
* on `write_corpus(n=--nn-n, seed=0)`: nearest neighbours within families, and a
  suggested mining band (more with --band LO HI).

    python jobs/train_clip.py --eval-only cir/weights/cir-shapes.safetensors

prints the figures again for a weights file (or 'random' for untrained weights).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir import clip_eval, clip_train  # noqa: E402
from cir.data.shapes_corpus import write_corpus  # noqa: E402
from cir.encoders import pick_device  # noqa: E402
from cir.outputs import write_json_atomic  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cir-shapes", help="open_clip architecture (default cir-shapes)")
    p.add_argument("--n-images", type=int, default=20000, help="training corpus size")
    p.add_argument("--corpus-seed", type=int, default=1000, help="seed of the training corpus")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    p.add_argument("--epochs", type=float, default=12)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="stored weight dtype")
    p.add_argument("--output", help="weights file to write (.safetensors); required unless --eval-only")
    p.add_argument("--eval-only", metavar="WEIGHTS",
                   help="skip training: evaluate this weights file (or 'random' for untrained weights)")
    p.add_argument("--eval-n", type=int, default=1000, help="held-out scenes for recall")
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--nn-n", type=int, default=2000, help="size of the seed-0 corpus for neighbours")
    p.add_argument("--band", nargs=2, type=float, action="append", default=[], metavar=("LO", "HI"),
                   help="also report what mining in this cosine band would take (repeatable)")
    p.add_argument("--metrics-json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def fmt_pct(d: dict) -> str:
    return " ".join(f"p{k}={v:.3f}" for k, v in d.items())


def report(m: dict) -> None:
    h, c = m["heldout"], m["corpus_seed0"]
    print(f"\nheld-out ({h['n']} fresh scenes, seed {h['seed']}): text->image R@1 {h['t2i_R@1']:.3f} "
          f"R@5 {h['t2i_R@5']:.3f}; image->text R@1 {h['i2t_R@1']:.3f} R@5 {h['i2t_R@5']:.3f}")
    print(f"  same scene re-rendered: cosine {fmt_pct(h['rerender_cosine'])}; "
          f"is nearest neighbour {h['rerender_is_nn']:.3f}")
    print(f"corpus seed 0 ({c['n']} images): nearest neighbour in same family {c['nn_same_group']:.3f}")
    for key in ("nn_cosine", "nn_cosine_same_group", "nn_cosine_other_group", "all_pairs_cosine",
                "pairs_cosine_same_group", "pairs_cosine_other_group"):
        print(f"  {key:<26} {fmt_pct(c[key])}")
    print(f"suggested mining band: {m['suggested_band']}")
    for b in m["bands"]:
        print(f"  band [{b['band'][0]:.2f}, {b['band'][1]:.2f}]: nearest neighbour in band "
              f"{b['nn_in_band']:.3f} (same family {b['nn_in_band_same_family']:.3f}); "
              f"{b['pairs_in_band']} pairs in band (same family {b['pairs_in_band_same_family']:.3f})")


def finish(metrics: dict, a, seconds: dict) -> dict:
    """Record the timings and arguments, print the report, write --metrics-json."""
    metrics["seconds"] = seconds
    metrics["args"] = vars(a)
    report(metrics)
    if a.metrics_json:
        write_json_atomic(a.metrics_json, metrics, sort_keys=False)
    return metrics


def eval_only(a) -> dict:
    start = time.perf_counter()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    model = clip_eval.load_model(a.model, a.eval_only, a.device, a.seed)
    metrics = clip_eval.evaluate(model, a.model, a.eval_n, a.eval_seed, a.nn_n, a.band)
    print(f"evaluated {a.model} with {a.eval_only} weights")
    return finish(metrics, a, {"total": round(time.perf_counter() - start, 1)})


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.eval_only:
        return eval_only(a)
    if not a.output:
        raise SystemExit("--output is required (or pass --eval-only WEIGHTS)")
    cfg = clip_train.TrainConfig(
        model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, seed=a.seed,
        threads=a.threads, device=a.device, log_every=a.log_every)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cir-clip-") as tmp:
        folder = write_corpus(Path(tmp) / "train-corpus", a.n_images, seed=a.corpus_seed)
        model = clip_train.create_model(a.model, pick_device(a.device), a.seed)
        images, tokens, _ = clip_train.corpus_pairs(folder, a.model, clip_train.image_size_of(model))
    t_data = time.perf_counter() - start
    print(f"corpus: {len(images)} images (seed {a.corpus_seed}) ready in {t_data:.1f}s", flush=True)
    model, _ = clip_train.train(images, tokens, cfg, model=model, log=lambda s: print(s, flush=True))
    t_train = time.perf_counter() - start - t_data
    meta = clip_train.config_metadata(cfg, n_images=a.n_images, corpus_seed=a.corpus_seed, arch=a.model)
    path = clip_train.save_weights(model, a.output, a.dtype, meta)
    clip_train.round_weights(model, a.dtype)  # evaluate exactly what was saved
    print(f"trained in {t_train:.1f}s; saved {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
    metrics = clip_eval.evaluate(model, a.model, a.eval_n, a.eval_seed, a.nn_n, a.band)
    metrics = finish(metrics, a, {"data": round(t_data, 1), "train": round(t_train, 1),
                                  "total": round(time.perf_counter() - start, 1)})
    print(f"total {metrics['seconds']['total']:.1f}s")
    return metrics


if __name__ == "__main__":
    main()
