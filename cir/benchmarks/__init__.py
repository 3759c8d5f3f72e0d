"""Readers for the CIR benchmarks (CIRR, FashionIQ, CIRCO, shapes).

`load_benchmark(name, split, annotations_dir, image_dir)` is the one entry point jobs
use, so that a config names a benchmark by string. Annotation and image folders are
always given by the caller: the library never guesses where the data lives.
Other readers join the registry with `register_benchmark`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cir.benchmarks.base import Benchmark, BenchmarkFormatError, Query
from cir.benchmarks.circo import load_circo
from cir.benchmarks.cirr import load_cirr
from cir.benchmarks.fashioniq import CATEGORIES as FASHIONIQ_CATEGORIES
from cir.benchmarks.fashioniq import load_fashioniq, load_fashioniq_all
from cir.benchmarks.shapes import load_shapes

# name -> loader(split, annotations_dir, image_dir) -> Benchmark
Loader = Callable[[str, "str | Path", "str | Path | None"], Benchmark]
_LOADERS: dict[str, Loader] = {
    "cirr": load_cirr,
    "circo": load_circo,
    "shapes": load_shapes,
}
for _cat in FASHIONIQ_CATEGORIES:
    _LOADERS[f"fashioniq-{_cat}"] = (
        lambda split, ann, img=None, _c=_cat: load_fashioniq(_c, split, ann, img)
    )


def register_benchmark(name: str, loader: Loader) -> None:
    """Make `load_benchmark(name, ...)` call `loader(split, annotations_dir, image_dir)`."""
    _LOADERS[name] = loader


def benchmark_names() -> list[str]:
    return sorted(_LOADERS)


def load_benchmark(
    name: str, split: str, annotations_dir: str | Path, image_dir: str | Path | None = None
) -> Benchmark:
    """Load a benchmark split by name ("cirr", "fashioniq-dress", "circo", ...).

    "fashioniq" alone is three benchmarks (one per category, reported as their mean):
    use `load_fashioniq_all`, or name one category.
    """
    if name == "fashioniq":
        raise ValueError(
            "fashioniq is evaluated per category: name one of "
            + ", ".join(f"fashioniq-{c}" for c in FASHIONIQ_CATEGORIES)
            + " or call cir.benchmarks.load_fashioniq_all"
        )
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}")
    return _LOADERS[name](split, annotations_dir, image_dir)


__all__ = [
    "Benchmark",
    "BenchmarkFormatError",
    "Query",
    "benchmark_names",
    "load_benchmark",
    "load_circo",
    "load_cirr",
    "load_fashioniq",
    "load_fashioniq_all",
    "load_shapes",
    "register_benchmark",
]
