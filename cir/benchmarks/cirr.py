"""CIRR reader (Liu et al., ICCV 2021; github.com/Cuberick-Orion/CIRR, release rc2).

Files under `annotations_dir`:
* `captions/cap.rc2.{split}.json`: list of {pairid, reference, target_hard,
  target_soft, caption, img_set{id, members, reference_rank, target_rank}};
  test1 has no target_hard / target_soft / target_rank.
* `image_splits/split.rc2.{split}.json`: {image_name: "./dev/<name>.png"}: the gallery
  of the split and each image's path relative to the CIRR image root.

`image_dir` is that image root (the folder holding train/, dev/, test1/), as in
CLIP4Cir's `cirr_dataset/`. The protocol ranks the whole split gallery with the
reference removed (Recall@K) and, separately, the query's six `img_set.members`
minus the reference (Recall_subset@K), as CIRR's and CLIP4Cir's evaluation code do.
"""
from __future__ import annotations

from pathlib import Path

from cir.benchmarks.base import (
    Benchmark,
    BenchmarkFormatError,
    Query,
    check_split,
    load_json,
    require_key,
    require_str_list,
)

SPLITS = ("train", "val", "test1")


def captions_file(annotations_dir: Path, split: str) -> Path:
    return Path(annotations_dir) / "captions" / f"cap.rc2.{split}.json"


def split_file(annotations_dir: Path, split: str) -> Path:
    return Path(annotations_dir) / "image_splits" / f"split.rc2.{split}.json"


def load_cirr(split: str, annotations_dir: str | Path, image_dir: str | Path | None = None) -> Benchmark:
    """Read one CIRR split; every reference, target and subset member must be in its gallery."""
    check_split("cirr", split, SPLITS)
    cap_path = captions_file(annotations_dir, split)
    img_path = split_file(annotations_dir, split)
    entries = load_json(cap_path, list)
    relpaths = load_json(img_path, dict)
    for name, rel in relpaths.items():
        if not isinstance(rel, str):
            raise BenchmarkFormatError(
                f"{img_path.name}: image {name!r} has a non-string path ({img_path})"
            )
    has_targets = split != "test1"

    queries = []
    for i, e in enumerate(entries):
        pairid = require_key(e, "pairid", cap_path, i, int)
        ref = require_key(e, "reference", cap_path, i, str)
        caption = require_key(e, "caption", cap_path, i, str)
        img_set = require_key(e, "img_set", cap_path, i, dict)
        members = require_str_list(img_set, "members", cap_path, i)
        meta = {
            "img_set_id": img_set.get("id"),
            "reference_rank": img_set.get("reference_rank"),
        }
        targets: tuple[str, ...] = ()
        if has_targets:
            target = require_key(e, "target_hard", cap_path, i, str)
            targets = (target,)
            meta["target_soft"] = dict(require_key(e, "target_soft", cap_path, i, dict))
            meta["target_rank"] = img_set.get("target_rank")
        for image_id in (ref, *targets, *members):
            if image_id not in relpaths:
                raise BenchmarkFormatError(
                    f"{cap_path.name}: entry {i} (pairid {pairid}) names image {image_id!r}, "
                    f"which is not in {img_path.name}"
                )
        if ref not in members:
            raise BenchmarkFormatError(
                f"{cap_path.name}: entry {i} (pairid {pairid}): reference {ref!r} is not in "
                "img_set.members"
            )
        queries.append(
            Query(
                query_id=str(pairid),
                ref_id=ref,
                text=caption,
                target_ids=targets,
                subset_ids=tuple(members),
                meta=meta,
            )
        )

    return Benchmark(
        name="cirr",
        split=split,
        queries=queries,
        gallery_ids=list(relpaths),
        image_dir=Path(image_dir) if image_dir is not None else None,
        protocol="cirr",
        exclude_reference=True,
        image_relpaths=relpaths,
        meta={"captions_file": str(cap_path), "split_file": str(img_path)},
    )
