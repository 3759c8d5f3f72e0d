"""Text-generation backends for the synth job's generate stage.

A backend is a callable class used with Ray Data `map_batches` over an actor pool.
Its input batch (a pyarrow Table) holds the mined pairs with both captions:
`pair_id, ref_id, tgt_id, similarity, ref_caption, tgt_caption`; it returns rows of
the triplets schema (zero, one or several per pair). Backends are named here and
imported only when chosen, so that heavy ones (vLLM) never load where unused.
"""
from __future__ import annotations

import importlib

# name -> "module:Class"
BACKENDS = {
    "template": "cir.generate.template:TemplateGenerator",
}


def get_backend(name: str):
    """The backend class registered as `name` (ValueError naming the known ones)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown text-generation backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
