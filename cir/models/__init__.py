"""Trained models: the LLM-based query composer, its export format and its query encoder.

Importing this package is cheap (no torch); the names below load on first use.

    from cir.models import ComposerConfig, build_composer, export_composer, load_composer
    enc = load_query_encoder("checkpoint:runs/x/export")   # what evaluation calls
"""
from __future__ import annotations

_LAZY = {
    "ComposerConfig": "cir.models.config",
    "Composer": "cir.models.composer",
    "build_composer": "cir.models.composer",
    "export_composer": "cir.models.export",
    "load_composer": "cir.models.export",
    "ComposerQueryEncoder": "cir.models.export",
}
__all__ = sorted([*_LAZY, "load_query_encoder"])


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cir.models' has no attribute {name!r}")


def load_query_encoder(spec: str, encoder: str | None = None, *, device: str | None = None,
                       threads: int | None = None, precision: str = "fp32", batch_size: int = 64):
    """A `ComposerQueryEncoder` for an exported composer: "checkpoint:PATH" or PATH.

    `encoder` (the evaluation's --encoder) is not used: a checkpoint carries its own
    vision tower; a warning says so when it names a different one."""
    from cir.models.export import ComposerQueryEncoder

    path = spec[len("checkpoint:"):] if spec.startswith("checkpoint:") else spec
    return ComposerQueryEncoder(path, device=device, threads=threads, precision=precision,
                                batch_size=batch_size, expected_encoder=encoder)
