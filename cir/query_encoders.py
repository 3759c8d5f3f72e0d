"""Query encoders: what evaluation, the index job and serving call to embed CIR queries
and gallery images, and the spec strings that name them.

A query encoder turns (reference image, modification text) into one L2-normalised
vector and gallery images into vectors of the same space; retrieval ranks the gallery
by dot product. Specs are plain strings so that a Ray actor can rebuild the same
encoder from them (a model is never pickled across processes):

* `baseline:image-only`, `baseline:text-only`, `baseline:sum`: the zero-shot baselines
  of `cir.baselines`, on one open_clip encoder (`encoder=`, e.g. "cir-tiny");
* `checkpoint:PATH`: a trained composer exported by `jobs/train.py` (`cir.models`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

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


@dataclass(frozen=True)
class QuerySpec:
    """A parsed model spec: kind "baseline" (value: the mode) or "checkpoint" (a path)."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def is_query_spec(spec: str) -> bool:
    """A query-encoder spec, as opposed to an open_clip encoder name."""
    return spec.strip().startswith((BASELINE_PREFIX, CHECKPOINT_PREFIX))


def parse_query_spec(spec: str) -> QuerySpec:
    """Parse and check a model spec without building anything (cheap; no torch)."""
    from cir.baselines import BASELINES

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


def check_query_spec(spec: str, encoder: str | None = None) -> QuerySpec:
    """Everything that can be checked before a job starts Ray: the spec's form, the
    encoder name of a baseline, and that a checkpoint's path exists."""
    parsed = parse_query_spec(spec)
    if parsed.kind == "baseline":
        if not encoder:
            raise ValueError(f"model {spec!r} needs an encoder name (--encoder, e.g. cir-tiny)")
        from cir.encoders import validate_encoder_name

        validate_encoder_name(encoder)
    elif not _exists(parsed.value):
        raise FileNotFoundError(f"checkpoint not found: {parsed.value}")
    return parsed


def _exists(path: str) -> bool:
    from cir.storage import resolve

    return resolve(path).exists()


def load_query_encoder(spec: str, encoder: str | None = None, *, device: str | None = None,
                       threads: int | None = None, precision: str = "fp32", seed: int = 0) -> QueryEncoder:
    """Build the query encoder named by `spec`.

    A baseline runs on the open_clip encoder `encoder` (required); a checkpoint carries
    its own vision tower (`encoder`, when given, is only compared with it). Weights an
    encoder does not load (a built-in config without a weights file) are initialised
    from `seed`, so every process builds the same model; the caller's global torch RNG
    state is left as it was.
    """
    parsed = check_query_spec(spec, encoder)
    if parsed.kind == "baseline":
        from cir.baselines import BaselineQueryEncoder
        from cir.encoders import ClipEncoder, seeded_init

        with seeded_init(seed):
            clip = ClipEncoder(encoder, device=device, threads=threads, precision=precision)
        return BaselineQueryEncoder(parsed.value, clip)
    from cir.models import load_query_encoder as load_composer_encoder

    return load_composer_encoder(parsed.value, encoder=encoder, device=device, threads=threads,
                                 precision=precision)


def gallery_identity(spec: str, image_encoder: str | None = None) -> str:
    """What a gallery's vectors depend on, so that serving can check it encodes queries
    into the same space: the open_clip tower for an open_clip name or any baseline (all
    baselines embed the gallery with their tower's image side), the export's absolute
    path (or URI) for a checkpoint."""
    from cir.encoders import parse_encoder_name
    from cir.storage import resolve

    if not is_query_spec(spec):
        return f"open_clip:{parse_encoder_name(spec).alias or spec.strip().removeprefix('open_clip:')}"
    parsed = parse_query_spec(spec)
    if parsed.kind == "checkpoint":
        return f"checkpoint:{resolve(parsed.value)}"     # an absolute path, or a URI without credentials
    if not image_encoder:
        raise ValueError(f"model {spec!r} needs an encoder name (e.g. cir-shapes)")
    return gallery_identity(image_encoder)


def serving_model(manifest: dict, model: str | None = None, encoder: str | None = None) -> tuple[str, str | None]:
    """The (query-encoder spec, open_clip tower) that serves the index of `manifest`:
    `model`/`encoder` when given, else the index's own checkpoint or baseline, or
    baseline:sum over its open_clip encoder. Refuses (`build.check_encoder`) a model whose
    gallery side differs from the index's."""
    from cir.index.build import check_encoder

    built = manifest["encoder"]
    if model is None:
        model = built if is_query_spec(built) else "baseline:sum"
    if parse_query_spec(model).kind == "baseline" and encoder is None:
        encoder = manifest.get("image_encoder") if is_query_spec(built) else built
    check_encoder(manifest, model, image_encoder=encoder)
    return model, encoder
