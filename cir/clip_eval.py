"""Held-out figures of a shapes CLIP (`cir.clip_train`): retrieval, re-render stability,
family neighbours, and the similarity band that pair mining should use.

`evaluate` measures, with `jobs/train_clip.py` printing the result:

* on `eval_n` fresh scenes (seed `eval_seed`) from outside the "corpus" partition, so
  never seen in training: text->image Recall@1/5 and image->text Recall@1/5 (each
  caption against all the images), and the cosine between two renders of the same scene;
* on `write_corpus(n=nn_n, seed=0)`: the share of images whose nearest neighbour is in
  the same family, and the percentiles of nearest-neighbour and all-pairs cosine, from
  which a mining band is suggested (`suggest_band`) and what mining in it would take
  is reported (`band_stats`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from cir import clip_train
from cir.data.shapes import caption, random_scene, render
from cir.data.shapes_corpus import partition, write_corpus
from cir.encoders import _open_clip, pick_device

PERCENTILES = (1, 10, 50, 90, 99)


def load_model(arch: str, weights: str, device: str = "auto", seed: int = 0):
    """The open_clip model `arch` in eval mode, with `weights` (a safetensors file), or
    with seeded untrained weights when `weights` is "random"."""
    if weights == "random":
        model = clip_train.create_model(arch, pick_device(device), seed)
    else:
        model = _open_clip().create_model(arch, pretrained=weights, device=pick_device(device))
    return model.eval()


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


def _uint8(images) -> torch.Tensor:
    """PIL images -> uint8 (N, 3, S, S), the input `clip_train.embed` takes."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def _percentiles(a: np.ndarray) -> dict[int, float]:
    return {p: float(np.percentile(a, p)) for p in PERCENTILES}


def evaluate(model, model_name: str, eval_n: int = 1000, eval_seed: int = 7, nn_n: int = 2000,
             bands=()) -> dict:
    """The figures of the module docstring; `bands` are extra (lo, hi) cosine bands to
    report beside the suggested one. The seed-0 corpus is written to a temporary folder."""
    size = clip_train.image_size_of(model)
    scenes, seeds = heldout_scenes(eval_n, eval_seed)
    img_a = _uint8([render(s, size, seed=int(r)) for s, r in zip(scenes, seeds[:, 0])])
    img_b = _uint8([render(s, size, seed=int(r)) for s, r in zip(scenes, seeds[:, 1])])
    tokens = _open_clip().get_tokenizer(model_name)([caption(s) for s in scenes])
    ea, eb = clip_train.embed(model, images=img_a), clip_train.embed(model, images=img_b)
    et = clip_train.embed(model, tokens=tokens)
    out = {"heldout": {"n": eval_n, "seed": eval_seed, **clip_train.retrieval_recall(ea, et)}}
    out["heldout"]["rerender_cosine"] = _percentiles(np.sum(ea * eb, axis=1))
    out["heldout"]["rerender_is_nn"] = float(np.mean((eb @ ea.T).argmax(1) == np.arange(eval_n)))

    with tempfile.TemporaryDirectory(prefix="cir-clip-eval-") as tmp:
        folder = write_corpus(Path(tmp) / "nn-corpus", nn_n, seed=0)
        images, _, families = clip_train.corpus_pairs(folder, model_name, size)
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
