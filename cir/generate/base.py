"""What every text-generation backend shares: the stage interface, the input contract
and the output rows."""
from __future__ import annotations

import abc
import hashlib
from dataclasses import asdict

import pyarrow as pa

from cir import schemas

INPUT_COLUMNS = ("pair_id", "ref_id", "tgt_id", "similarity", "ref_caption", "tgt_caption")


class Backend(abc.ABC):
    """A text-generation stage: `apply(pairs) -> triplets`, both Ray Datasets.

    `options` is the backend's own options dataclass; `batch_size` and `num_actors` are
    the synth config's generic sizing, which a backend maps onto its machinery."""

    name = ""
    source = ""               # the triplets' `source` column
    needs_captions = True     # the corpus must have a caption per image
    needs_corpus = False      # reads the images (`corpus_files`, set by the synth job)
    corpus_files: list[str] = []

    def __init__(self, options, batch_size: int, num_actors: int, task=None):
        # `task` (generate.options) is what the LLM backends are asked to write.
        self.options, self.batch_size, self.num_actors = options, batch_size, num_actors

    def validate(self) -> None:
        """Checks that need no data and no cluster (options, models, packages): called
        before Ray starts."""

    def check_cluster(self) -> None:
        """Checks against the running cluster (e.g. GPUs): called after `ray.init`,
        before the synth job writes anything."""

    def fingerprint(self) -> dict:
        """What the triplets depend on: a finished stage made with another is refused."""
        return {"backend": self.name, "options": asdict(self.options)}

    @abc.abstractmethod
    def apply(self, pairs):
        """The triplets Dataset of a pairs Dataset (lazy: the synth job writes it)."""


def triplet_id(pair_id: str, generator: str, index: int) -> str:
    """Stable id: the same pair, generator and text index always give the same id."""
    digest = hashlib.sha1(f"{pair_id}\x1f{generator}\x1f{index}".encode()).hexdigest()[:16]
    return f"t-{digest}"


def triplet_rows(pairs: pa.Table, keep: list[int], texts: list[str], reverse_texts: list,
                 source: str, generators: list[str], text_index: list[int] | None = None) -> pa.Table:
    """Triplets-schema rows for the pairs at row positions `keep` of `pairs`."""
    if not (len(keep) == len(texts) == len(reverse_texts) == len(generators)):
        raise ValueError("keep, texts, reverse_texts and generators must have equal length")
    text_index = text_index or [0] * len(keep)
    pair_ids = pairs.column("pair_id").to_pylist()
    take = pa.array(keep, type=pa.int64())
    return pa.table(
        {
            "triplet_id": [triplet_id(pair_ids[i], g, j) for i, g, j in zip(keep, generators, text_index)],
            "ref_id": pairs.column("ref_id").take(take),
            "tgt_id": pairs.column("tgt_id").take(take),
            "text": texts,
            "reverse_text": reverse_texts,
            "source": [source] * len(keep),
            "generator": generators,
            "similarity": pairs.column("similarity").take(take),
        },
        schema=schemas.TRIPLETS,
    )


CANDIDATE_COLUMNS = ("ref_caption", "tgt_caption", "direction")


def candidate_rows(triplets: pa.Table, pairs: pa.Table, keep: list[int], repeats: list[bool] | None = None) -> pa.Table:
    """Triplet rows as the quality filter takes them: with the pair's captions (and image
    `direction`, when the pairs carry one) and `repeats` (the text repeats an earlier one
    of its pair)."""
    take = pa.array(keep, type=pa.int64())
    for name in CANDIDATE_COLUMNS:
        if name in pairs.column_names:
            triplets = triplets.append_column(name, pairs.column(name).take(take))
    repeats = repeats if repeats is not None else [False] * len(keep)
    return triplets.append_column("repeats", pa.array(repeats, type=pa.bool_()))
