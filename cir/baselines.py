"""The zero-shot baselines, each a `cir.query_encoders.QueryEncoder` on one open_clip
encoder (`--encoder`):

* `baseline:image-only`: the reference image's embedding (ignores the text);
* `baseline:text-only`: the text's embedding (ignores the reference);
* `baseline:sum`: normalise(normalise(image) + normalise(text)), the usual
  "image + text" late-fusion baseline of the CIR literature.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BASELINES = ("image-only", "text-only", "sum")


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of `x` scaled to unit length (all-zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


class BaselineQueryEncoder:
    """A zero-shot baseline on one image/text encoder (an `cir.encoders.ClipEncoder`, or
    anything with `name`, `dim`, `encode_images(list of PIL)` and `encode_texts(list of
    str)` returning rows in one space: tests pass a hand-made one)."""

    def __init__(self, mode: str, clip):
        if mode not in BASELINES:
            raise ValueError(f"unknown baseline {mode!r}; valid: {', '.join(BASELINES)}")
        self.mode = mode
        self.clip = clip
        self.encoder = str(getattr(clip, "name", type(clip).__name__))
        self.name = f"baseline:{mode}@{self.encoder}"
        self.dim = int(clip.dim)
        self.uses_images = mode in ("image-only", "sum")
        self.uses_texts = mode in ("text-only", "sum")

    def __repr__(self) -> str:
        return f"BaselineQueryEncoder({self.name!r})"

    def encode_queries(self, ref_images: Sequence, texts: Sequence[str]) -> np.ndarray:
        if len(ref_images) != len(texts):
            raise ValueError(f"{len(ref_images)} reference images for {len(texts)} texts")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.uses_images and any(im is None for im in ref_images):
            raise ValueError(f"{self.name} needs every reference image (got None)")
        if self.uses_texts and any(t is None for t in texts):
            raise ValueError(f"{self.name} needs every text (got None)")
        if self.mode == "image-only":
            return l2_normalise(self.clip.encode_images(list(ref_images)))
        if self.mode == "text-only":
            return l2_normalise(self.clip.encode_texts(list(texts)))
        img = l2_normalise(self.clip.encode_images(list(ref_images)))
        txt = l2_normalise(self.clip.encode_texts(list(texts)))
        return l2_normalise(img + txt)

    def encode_gallery(self, images: Sequence) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(self.clip.encode_images(list(images)))
