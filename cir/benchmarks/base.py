"""Common types of the benchmark readers: a benchmark is queries + gallery ids + images.

Every reader (CIRR, FashionIQ, CIRCO, and the embedded shapes world) produces the same
`Benchmark`, so that metrics, submission writers and jobs never branch on the file
format. Ids are strings everywhere (CIRCO's integer ids included); the submission
writers convert back to the type each official server expects.

The helpers at the bottom (`load_json`, `require_key`) exist so that a malformed
annotation file fails with a message naming the file, the entry and the key, instead
of a bare KeyError deep inside an evaluation job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# Protocol names understood by `cir.metrics.evaluate_*`.
PROTOCOLS = ("cirr", "fashioniq", "circo", "recall")


class BenchmarkFormatError(ValueError):
    """An annotation file does not have the structure its benchmark documents."""


@dataclass(frozen=True)
class Query:
    """One CIR query: reference image + modification text -> target image(s).

    `target_ids` is empty on test splits whose ground truth is withheld (CIRR test1,
    CIRCO test). For CIRCO it holds all `gt_img_ids`, the annotated target first.
    `subset_ids` is CIRR's `img_set.members` (reference included), used by
    Recall_subset; None elsewhere.
    """

    query_id: str
    ref_id: str
    text: str
    target_ids: tuple[str, ...] = ()
    subset_ids: tuple[str, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Benchmark:
    """Queries of one split, the gallery they are ranked against, and their images.

    protocol: which metrics apply ("cirr", "fashioniq", "circo", or "recall" for a
        plain Recall@K benchmark such as the shapes world).
    exclude_reference: whether the official protocol removes the query's reference
        image from the ranking (CIRR: yes; FashionIQ, CIRCO: no).
    Image files are found as `image_dir / image_relpaths[id]` when a relative path
    is recorded (CIRR), else `image_dir / image_name_format.format(id=id) + suffix`
    for the first of `image_suffixes` that exists. `image_source`, when set, returns
    the encoded bytes of an image (for benchmarks rendered in memory or stored in a
    Parquet corpus) and takes precedence in `image_bytes`.
    """

    name: str
    split: str
    queries: list[Query]
    gallery_ids: list[str]
    image_dir: Path | None = None
    protocol: str = "recall"
    exclude_reference: bool = False
    image_relpaths: Mapping[str, str] | None = None
    image_name_format: str = "{id}"
    image_suffixes: tuple[str, ...] = (".png", ".jpg", ".jpeg")
    image_source: Callable[[str], bytes] | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if self.image_dir is not None:
            self.image_dir = Path(self.image_dir)
        seen: set[str] = set()
        for q in self.queries:
            if q.query_id in seen:
                raise BenchmarkFormatError(f"{self.name} {self.split}: duplicate query id {q.query_id!r}")
            seen.add(q.query_id)
        if len(set(self.gallery_ids)) != len(self.gallery_ids):
            raise BenchmarkFormatError(f"{self.name} {self.split}: duplicate ids in the gallery")
        self._gallery_index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def __repr__(self) -> str:
        return (
            f"Benchmark({self.name!r}, split={self.split!r}, queries={len(self.queries)}, "
            f"gallery={len(self.gallery_ids)}, image_dir={self.image_dir})"
        )

    # ---- ids <-> gallery indices -------------------------------------------------
    @property
    def query_ids(self) -> list[str]:
        return [q.query_id for q in self.queries]

    @property
    def has_targets(self) -> bool:
        """True when every query has ground truth (val splits), False on test splits."""
        return bool(self.queries) and all(q.target_ids for q in self.queries)

    @property
    def gallery_index(self) -> dict[str, int]:
        """Map image id -> row in `gallery_ids` (built once)."""
        if self._gallery_index is None or len(self._gallery_index) != len(self.gallery_ids):
            self._gallery_index = {g: i for i, g in enumerate(self.gallery_ids)}
        return self._gallery_index

    def indices_of(self, ids: Sequence[str], what: str = "image") -> np.ndarray:
        """Gallery rows of `ids`; a KeyError names the first id not in the gallery."""
        index = self.gallery_index
        try:
            return np.fromiter((index[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise KeyError(
                f"{self.name} {self.split}: {what} id {e.args[0]!r} is not in the gallery "
                f"({len(self.gallery_ids)} images)"
            ) from None

    def reference_indices(self) -> np.ndarray:
        """[Q] gallery row of each query's reference image."""
        return self.indices_of([q.ref_id for q in self.queries], "reference")

    def target_indices(self) -> np.ndarray:
        """[Q, T] gallery rows of each query's targets, padded with -1 (T = most targets)."""
        return self._padded([q.target_ids for q in self.queries], "target")

    def subset_indices(self) -> np.ndarray:
        """[Q, M] gallery rows of each query's `subset_ids`, padded with -1."""
        if any(q.subset_ids is None for q in self.queries):
            raise ValueError(f"{self.name} {self.split}: queries have no subsets")
        return self._padded([q.subset_ids for q in self.queries], "subset member")

    def _padded(self, rows: Sequence[Sequence[str]], what: str) -> np.ndarray:
        width = max((len(r) for r in rows), default=0)
        out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = self.indices_of(r, what)
        return out

    def check_query_ids(self, per_query: Mapping[str, Any], what: str = "predictions") -> None:
        """ValueError unless `per_query` has exactly this split's query ids as keys."""
        keys = {str(k) for k in per_query}
        ids = self.query_ids
        missing = [q for q in ids if q not in keys]
        unknown = sorted(keys - set(ids))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of {len(ids)} queries missing (e.g. {missing[:5]})")
            if unknown:
                parts.append(f"{len(unknown)} unknown query ids (e.g. {unknown[:5]})")
            raise ValueError(f"{what} for {self.name} {self.split}: " + "; ".join(parts))

    # ---- images ------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        """Path of the image file of `image_id`; FileNotFoundError names id and path(s) tried."""
        if self.image_dir is None:
            raise FileNotFoundError(
                f"{self.name}: no image_dir was given, so image {image_id!r} cannot be located"
            )
        if self.image_relpaths is not None and image_id in self.image_relpaths:
            tried = [self.image_dir / self.image_relpaths[image_id]]
        else:
            stem = self.image_name_format.format(id=image_id)
            tried = [self.image_dir / (stem + s) for s in self.image_suffixes]
        for path in tried:
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"{self.name}: image {image_id!r} not found; tried {', '.join(str(p) for p in tried)}"
        )

    def image_bytes(self, image_id: str) -> bytes:
        """Encoded bytes of an image, from `image_source` if set, else from its file."""
        if self.image_source is not None:
            return self.image_source(image_id)
        return self.image_path(image_id).read_bytes()


# ---- helpers for the readers -------------------------------------------------------
def check_split(benchmark: str, split: str, valid: Sequence[str]) -> None:
    """ValueError listing the valid splits when `split` is not one of them."""
    if split not in valid:
        raise ValueError(f"{benchmark}: unknown split {split!r}; valid splits: {', '.join(valid)}")


def load_json(path: Path, expected: type) -> Any:
    """Parse a JSON annotation file, checking its top-level type (list or dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, expected):
        raise BenchmarkFormatError(
            f"{path}: expected a JSON {'list' if expected is list else 'object'} at the top "
            f"level, got {type(data).__name__}"
        )
    return data


def require_key(entry: Any, key: str, path: Path, index: int, types: type | tuple[type, ...]) -> Any:
    """entry[key], checked for presence and type; errors name file, entry and key."""
    if not isinstance(entry, dict):
        raise BenchmarkFormatError(f"{Path(path).name}: entry {index} is not a JSON object ({path})")
    if key not in entry:
        raise BenchmarkFormatError(f"{Path(path).name}: entry {index} has no key {key!r} ({path})")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise BenchmarkFormatError(
            f"{Path(path).name}: entry {index} key {key!r} should be {names}, "
            f"got {type(value).__name__} ({path})"
        )
    return value


def require_str_list(entry: dict, key: str, path: Path, index: int, item_types=(str,)) -> list:
    """entry[key] as a list whose items all have `item_types` (ids, captions)."""
    value = require_key(entry, key, path, index, list)
    for item in value:
        if not isinstance(item, item_types) or isinstance(item, bool):
            raise BenchmarkFormatError(
                f"{Path(path).name}: entry {index} key {key!r} holds a {type(item).__name__} "
                f"item ({item!r}) ({path})"
            )
    return value
