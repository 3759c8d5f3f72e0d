"""CIRCO reader (Baldrati et al., ICCV 2023; github.com/miccunifi/CIRCO).

File: `annotations_dir/annotations/{split}.json`, a list of {id, reference_img_id,
target_img_id, relative_caption, shared_concept, gt_img_ids, semantic_aspects}; the
test split has only id, reference_img_id, relative_caption, shared_concept.

* Ids are ints in the files and strings here ("271520"); `cir.submission` writes them
  back as ints, the type of the official example submission.
* `target_ids` = all `gt_img_ids` (CIRCO guarantees the first is `target_img_id`,
  the image the caption was written for, which Recall@K uses).
* Query text = `relative_caption` only. SEARLE prompts "a photo of $ that
  {relative_caption}"; other methods prepend `shared_concept`, kept in meta.
* The gallery is COCO 2017 unlabeled (about 123k images), not in the annotations:
  `gallery_ids` lists the `*.jpg` files of `image_dir` (the `unlabeled2017` folder,
  files named 000000271520.jpg -> id "271520"), and is empty without an `image_dir`.
* The official evaluation (src/evaluation.py) scores the submitted lists as they are
  and SEARLE ranks the whole gallery: the reference is NOT excluded.
"""
from __future__ import annotations

import os
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

SPLITS = ("val", "test")


def list_coco_images(image_dir: Path) -> list[str]:
    """Ids of the COCO images in a folder: numeric `*.jpg` stems without leading zeros."""
    ids = []
    with os.scandir(image_dir) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() == ".jpg" and stem.isdigit():
                ids.append(int(stem))
    return [str(i) for i in sorted(ids)]


def load_circo(split: str, annotations_dir: str | Path, image_dir: str | Path | None = None) -> Benchmark:
    """Read a CIRCO split. With `image_dir`, its COCO images become the gallery."""
    check_split("circo", split, SPLITS)
    path = Path(annotations_dir) / "annotations" / f"{split}.json"
    entries = load_json(path, list)
    has_targets = split == "val"

    queries = []
    for i, e in enumerate(entries):
        qid = require_key(e, "id", path, i, int)
        ref = require_key(e, "reference_img_id", path, i, int)
        caption = require_key(e, "relative_caption", path, i, str)
        meta = {"shared_concept": e.get("shared_concept")}
        targets: tuple[str, ...] = ()
        if has_targets:
            target = require_key(e, "target_img_id", path, i, int)
            gts = require_str_list(e, "gt_img_ids", path, i, item_types=(int,))
            if target not in gts:
                raise BenchmarkFormatError(
                    f"{path.name}: entry {i}: target_img_id {target} is not in gt_img_ids ({path})"
                )
            # CIRCO documents that gt_img_ids starts with target_img_id; keep that order.
            gts = [target] + [g for g in gts if g != target]
            targets = tuple(str(g) for g in gts)
            meta["target_img_id"] = str(target)
            meta["semantic_aspects"] = tuple(require_str_list(e, "semantic_aspects", path, i))
        queries.append(
            Query(query_id=str(qid), ref_id=str(ref), text=caption, target_ids=targets, meta=meta)
        )

    gallery: list[str] = []
    if image_dir is not None:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"circo: image_dir {image_dir} is not a folder")
        gallery = list_coco_images(image_dir)
        if not gallery:
            raise FileNotFoundError(
                f"circo: no COCO images (000000xxxxxx.jpg) in {image_dir}; "
                "give the COCO 2017 unlabeled2017 folder"
            )
    return Benchmark(
        name="circo",
        split=split,
        queries=queries,
        gallery_ids=gallery,
        image_dir=image_dir,
        protocol="circo",
        exclude_reference=False,
        image_name_format="{id:0>12}",
        image_suffixes=(".jpg",),
        meta={"annotations_file": str(path)},
    )
