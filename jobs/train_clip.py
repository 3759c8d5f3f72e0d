"""Train a small CLIP on the shapes world and report held-out retrieval figures.

    python jobs/train_clip.py --n-images 20000 --epochs 12 --lr 2e-3 \\
        --output cir/weights/cir-shapes.safetensors

Writes a shapes corpus (seed --corpus-seed, default 1000: not the 0/1 that the synth job
and the benchmark use) to a temporary folder, trains with `cir.clip_train`, saves the
weights (safetensors, fp16) and evaluates:

* on --eval-n fresh scenes (seed --eval-seed) from outside the "corpus" partition, so
  never seen in training: text->image Recall@1/5 and image->text Recall@1 (each caption
  against all the images), and the cosine between two renders of the same scene;
* on `write_corpus(n=--nn-n, seed=0)`: the share of images whose nearest neighbour is in
  the same family, and the percentiles of nearest-neighbour and all-pairs cosine, from
  which a mining band is suggested.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cir import clip_train  # noqa: E402
from cir.data.shapes import caption, random_scene, render  # noqa: E402
from cir.data.shapes_corpus import partition, write_corpus  # noqa: E402
from cir.encoders import _open_clip, pick_device  # noqa: E402


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


def corpus_pairs(folder: Path, model: str, image_size: int):
    table = pq.read_table(folder)
    images, tokens = clip_train.load_pairs(table, model, image_size)
    return images, tokens, table.column("category").to_pylist()


def heldout_scenes(n: int, seed: int):
    """`n` distinct random scenes that no corpus can contain, with two render seeds each."""
    rng = np.random.default_rng(seed)
    scenes, seen = [], set()
    while len(scenes) < n:
        s = random_scene(rng, 1, 4)
        if s not in seen and partition(s) != "corpus":
            seen.add(s)
            scenes.append(s)
    return scenes, rng.integers(2**31, size=(n, 2))


def _uint8(images) -> "torch.Tensor":  # noqa: F821
    import torch

    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def evaluate(model, model_name: str, eval_n: int, eval_seed: int, nn_n: int, tmp: Path,
             bands=()) -> dict:
    size = clip_train.image_size_of(model)
    scenes, seeds = heldout_scenes(eval_n, eval_seed)
    img_a = _uint8([render(s, size, seed=int(r)) for s, r in zip(scenes, seeds[:, 0])])
    img_b = _uint8([render(s, size, seed=int(r)) for s, r in zip(scenes, seeds[:, 1])])
    tokens = _open_clip().get_tokenizer(model_name)([caption(s) for s in scenes])
    ea, eb = clip_train.embed(model, images=img_a), clip_train.embed(model, images=img_b)
    et = clip_train.embed(model, tokens=tokens)
    out = {"heldout": {"n": eval_n, "seed": eval_seed, **clip_train.retrieval_recall(ea, et)}}
    rerender = np.sum(ea * eb, axis=1)
    out["heldout"]["rerender_cosine"] = {p: float(np.percentile(rerender, p)) for p in (1, 10, 50, 90, 99)}
    out["heldout"]["rerender_is_nn"] = float(np.mean((eb @ ea.T).argmax(1) == np.arange(eval_n)))

    folder = write_corpus(tmp / "nn-corpus", nn_n, seed=0)
    images, _, families = corpus_pairs(folder, model_name, size)
    emb = clip_train.embed(model, images=images)
    stats = clip_train.neighbour_stats(emb, families)
    out["corpus_seed0"] = {"n": nn_n, **stats}
    band = suggest_band(stats, out["heldout"]["rerender_cosine"])
    out["suggested_band"] = band
    out["bands"] = [band_stats(emb, families, lo, band[1])
                    for lo in sorted({band[0], 0.8, 0.85, 0.9}) if lo < band[1]]
    out["bands"] += [band_stats(emb, families, lo, hi) for lo, hi in bands]
    return out


def suggest_band(stats: dict, rerender: dict) -> list[float]:
    """[lo, hi]: lo keeps 90% of same-family nearest neighbours (the 10th percentile of
    their cosine), hi leaves out near-duplicates (the 1st percentile of the cosine
    between two renders of one scene); both rounded down to 0.01."""
    floor = lambda x: float(np.floor(x * 100) / 100)
    return [floor(stats["nn_cosine_same_group"][10]), floor(rerender[1])]


def band_stats(emb: np.ndarray, groups, lo: float, hi: float) -> dict:
    """What mining in [lo, hi] would take on this corpus: the share of images whose
    nearest neighbour is in the band, the share of those neighbours in the same family,
    and the number of all pairs in the band and their same-family share."""
    groups = np.asarray(groups)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    nn = sims.argmax(1)
    nn_sim = sims[np.arange(len(emb)), nn]
    in_band = (nn_sim >= lo) & (nn_sim <= hi)
    iu = np.triu_indices(len(emb), 1)
    pair_sim = sims[iu]
    pairs = (pair_sim >= lo) & (pair_sim <= hi)
    same = groups[iu[0]][pairs] == groups[iu[1]][pairs]
    return {"band": [lo, hi], "nn_in_band": float(in_band.mean()),
            "nn_in_band_same_family": float(np.mean(groups[nn][in_band] == groups[in_band]))
            if in_band.any() else 0.0,
            "pairs_in_band": int(pairs.sum()),
            "pairs_in_band_same_family": float(same.mean()) if same.size else 0.0}


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


def eval_only(a) -> dict:
    start = time.perf_counter()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.eval_only == "random":
        model = clip_train.create_model(a.model, pick_device(a.device), a.seed)
    else:
        model = _open_clip().create_model(a.model, pretrained=a.eval_only, device=pick_device(a.device))
    with tempfile.TemporaryDirectory(prefix="cir-clip-") as tmp:
        metrics = evaluate(model.eval(), a.model, a.eval_n, a.eval_seed, a.nn_n, Path(tmp),
                           a.band)
    metrics["seconds"] = {"total": round(time.perf_counter() - start, 1)}
    metrics["args"] = vars(a)
    print(f"evaluated {a.model} with {a.eval_only} weights")
    report(metrics)
    if a.metrics_json:
        Path(a.metrics_json).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


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
        tmp = Path(tmp)
        folder = write_corpus(tmp / "train-corpus", a.n_images, seed=a.corpus_seed)
        model = clip_train.create_model(a.model, pick_device(a.device), a.seed)
        images, tokens, _ = corpus_pairs(folder, a.model, clip_train.image_size_of(model))
        t_data = time.perf_counter() - start
        print(f"corpus: {len(images)} images (seed {a.corpus_seed}) ready in {t_data:.1f}s", flush=True)
        model, _ = clip_train.train(images, tokens, cfg, model=model,
                                    log=lambda s: print(s, flush=True))
        t_train = time.perf_counter() - start - t_data
        meta = clip_train.config_metadata(cfg, n_images=a.n_images, corpus_seed=a.corpus_seed,
                                          arch=a.model)
        path = clip_train.save_weights(model, a.output, a.dtype, meta)
        clip_train.round_weights(model, a.dtype)  # evaluate exactly what was saved
        print(f"trained in {t_train:.1f}s; saved {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
        metrics = evaluate(model, a.model, a.eval_n, a.eval_seed, a.nn_n, tmp, a.band)
    metrics["seconds"] = {"data": round(t_data, 1), "train": round(t_train, 1),
                          "total": round(time.perf_counter() - start, 1)}
    metrics["args"] = vars(a)
    report(metrics)
    print(f"total {metrics['seconds']['total']:.1f}s")
    if a.metrics_json:
        Path(a.metrics_json).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
