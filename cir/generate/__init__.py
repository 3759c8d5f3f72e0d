"""Text-generation backends for the synth job's triplets stage.

A backend is a stage, Ray Dataset to Ray Dataset: `apply(pairs) -> triplets`. Its input
rows are the mined pairs with both captions (`base.INPUT_COLUMNS`); its output rows
follow the triplets schema, zero, one or several per pair (`base.triplet_rows`). So a
backend may be a `map_batches` over an actor pool (the template backend) or a
`ray.data.llm` processor (which maps a Dataset to a Dataset). Each backend has a typed
options dataclass, one section of the synth config's `generate` (`generate.hf`, ...),
checked by `validate()` before any work starts, and `check_cluster()` once Ray is up.
The LLM backends (`hf`, `http`, `vllm`, see `llm.py`) share `generate.options`: texts
per pair, reverse texts, prompts and sampling. Backends are named here and imported
only when chosen, so that heavy ones never load where unused. `mtst` writes texts from
the pair's images with a trained generator (`jobs/train_generator.py`) instead.
"""
from __future__ import annotations

import importlib

# name -> "module:Class"
BACKENDS = {
    "template": "cir.generate.template:TemplateBackend",
    "hf": "cir.generate.hf:HFBackend",
    "http": "cir.generate.http:HttpBackend",
    "vllm": "cir.generate.vllm:VLLMBackend",
    "mtst": "cir.generate.mtst:MTSTBackend",
}


def backend_class(name: str):
    """The backend class registered as `name` (ValueError naming the known ones)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown text-generation backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(generate):
    """The backend a synth config's `generate` section chooses, with its options."""
    cls = backend_class(generate.backend)
    return cls(generate.backend_options(), batch_size=generate.batch_size, num_actors=generate.num_actors,
               task=generate.options)
