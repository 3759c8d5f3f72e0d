"""Query encoders: what evaluation and serving call to embed CIR queries and gallery images.

A query encoder turns (reference image, modification text) into one L2-normalised
vector and gallery images into vectors of the same space; retrieval ranks the gallery
by dot product. Every model the project evaluates implements `QueryEncoder`:

* the zero-shot baselines here, all on one open_clip encoder (`--encoder`):
  - `baseline:image-only`: the reference image's embedding (ignores the text);
  - `baseline:text-only`: the text's embedding (ignores the reference);
  - `baseline:sum`: normalise(normalise(image) + normalise(text)), the usual
    "image + text" late-fusion baseline of the CIR literature;
* trained composers, `checkpoint:PATH`, built by `cir.models.load_query_encoder`
  (imported lazily, so this module works before `cir.models` exists).

`load_query_encoder(spec, encoder=...)` builds one from its config string. Specs and
encoder names are plain strings so that a Ray actor can rebuild the same encoder from
them (a model is never pickled across processes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

BASELINES = ("image-only", "text-only", "sum")
BASELINE_PREFIX = "baseline:"
CHECKPOINT_PREFIX = "checkpoint:"
SPEC_HELP = ("baseline:image-only, baseline:text-only, baseline:sum (with an encoder name), "
             "or checkpoint:PATH")


@runtime_checkable
class QueryEncoder(Protocol):
    """The interface of every model that evaluation and serving rank with.

    name: a readable identity, e.g. "baseline:sum@cir-tiny" (written to metrics.json).
    encoder: the name of the underlying image/text encoder (or None).
    dim: the embedding width.
    uses_images / uses_texts: whether `encode_queries` looks at the reference images /
        the texts; callers may pass None items for an input that is not used (the
        evaluation then skips decoding reference images for a text-only model).
    encode_queries(ref_images, texts) -> float32 [N, dim], rows L2-normalised.
    encode_gallery(images) -> float32 [N, dim], rows L2-normalised.
    Images are RGB PIL images.
    """

    name: str
    encoder: str | None
    dim: int
    uses_images: bool
    uses_texts: bool

    def encode_queries(self, ref_images: Sequence, texts: Sequence[str]) -> np.ndarray: ...

    def encode_gallery(self, images: Sequence) -> np.ndarray: ...


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
        self.name = f"{BASELINE_PREFIX}{mode}@{self.encoder}"
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


@dataclass(frozen=True)
class QuerySpec:
    """A parsed model spec: kind "baseline" (value: the mode) or "checkpoint" (a path)."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def parse_query_spec(spec: str) -> QuerySpec:
    """Parse and check a model spec without building anything (cheap; no torch)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec is empty; valid: {SPEC_HELP}")
    spec = spec.strip()
    if spec.startswith(BASELINE_PREFIX):
        mode = spec[len(BASELINE_PREFIX):]
        if mode not in BASELINES:
            raise ValueError(f"unknown baseline {mode!r} in model spec {spec!r}; valid: {SPEC_HELP}")
        return QuerySpec("baseline", mode)
    if spec.startswith(CHECKPOINT_PREFIX):
        path = spec[len(CHECKPOINT_PREFIX):]
        if not path:
            raise ValueError(f"model spec {spec!r} names no checkpoint path")
        return QuerySpec("checkpoint", path)
    raise ValueError(f"unknown model spec {spec!r}; valid: {SPEC_HELP}")


def _models_module():
    """`cir.models` if it is importable, else None (an error inside it is not hidden)."""
    import importlib

    try:
        return importlib.import_module("cir.models")
    except ModuleNotFoundError as e:
        if e.name in ("cir.models",):
            return None
        raise


def check_query_spec(spec: str, encoder: str | None = None) -> QuerySpec:
    """Everything that can be checked before a job starts Ray: the spec's form, the
    encoder name of a baseline, and for a checkpoint that the path exists and that
    `cir.models` is there to load it."""
    parsed = parse_query_spec(spec)
    if parsed.kind == "baseline":
        if not encoder:
            raise ValueError(f"model {spec!r} needs an encoder name (--encoder, e.g. cir-tiny)")
        from cir.encoders import validate_encoder_name

        validate_encoder_name(encoder)
    else:
        if not Path(parsed.value).exists():
            raise FileNotFoundError(f"checkpoint not found: {parsed.value}")
        if _models_module() is None:
            raise ValueError("checkpoints need cir.models, which is not installed/built yet")
    return parsed


def load_query_encoder(
    spec: str,
    encoder: str | None = None,
    *,
    device: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> QueryEncoder:
    """Build the query encoder named by `spec`.

    "baseline:image-only" | "baseline:text-only" | "baseline:sum": on the open_clip
    encoder `encoder` (required: e.g. "cir-tiny", "ViT-L-14/openai").
    "checkpoint:PATH": `cir.models.load_query_encoder(PATH, encoder=..., device=...,
    threads=..., precision=...)`; a ValueError when `cir.models` does not exist yet.

    Weights an encoder does not load (a built-in config without a weights file) are
    initialised from `seed`, so every process (each Ray actor, each run) builds the
    same model and random-weight numbers are reproducible; the caller's global torch
    RNG state is left as it was.
    """
    parsed = check_query_spec(spec, encoder)
    if parsed.kind == "baseline":
        from cir.encoders import ClipEncoder, seeded_init

        with seeded_init(seed):
            clip = ClipEncoder(encoder, device=device, threads=threads, precision=precision)
        return BaselineQueryEncoder(parsed.value, clip)
    models = _models_module()
    loader = getattr(models, "load_query_encoder", None)
    if loader is None:
        raise ValueError("cir.models has no load_query_encoder, so checkpoints cannot be loaded")
    return loader(parsed.value, encoder=encoder, device=device, threads=threads, precision=precision)
