"""FashionIQ reader (Wu et al., CVPR 2021; github.com/XiaoxiaoGuo/fashion-iq).

One benchmark per category (dress, shirt, toptee), named "fashioniq-<category>";
the reported number is the mean over the three (see `cir.metrics.fashioniq_average`).
Files under `annotations_dir`:
* `captions/cap.{category}.{split}.json`: list of {target, candidate, captions: [2]};
  the candidate is the reference image;
* `image_splits/split.{category}.{split}.json`: list of image names: the gallery.

Query text: the two captions joined exactly as CLIP4Cir's validation code
(ABaldrati/CLIP4Cir, src/validate.py, `generate_fiq_val_predictions`) does:
f"{caps[0].strip('.?, ').capitalize()} and {caps[1].strip('.?, ')}". SEARLE uses the
same join without `capitalize()`; the official starter kit joins lower-cased token
lists with a "<and>" token. The raw captions stay in `meta["captions"]` for methods
that need another join.

Images: `{image_dir}/{name}.png`, or `.jpg` (the official starter kit and CLIP4Cir
read `images/{name}.jpg`; re-encoded copies are often PNG), whichever exists.
The protocol ranks the category's whole gallery without removing the reference
(neither CLIP4Cir nor the starter kit's Ranker removes it).
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

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")


def join_captions(first: str, second: str) -> str:
    """The CLIP4Cir join of FashionIQ's two relative captions."""
    return f"{first.strip('.?, ').capitalize()} and {second.strip('.?, ')}"


def load_fashioniq(
    category: str, split: str, annotations_dir: str | Path, image_dir: str | Path | None = None
) -> Benchmark:
    """Read one FashionIQ category. Query ids are "<category>-<index in the file>"."""
    if category not in CATEGORIES:
        raise ValueError(f"fashioniq: unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    check_split("fashioniq", split, SPLITS)
    root = Path(annotations_dir)
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    img_path = root / "image_splits" / f"split.{category}.{split}.json"
    entries = load_json(cap_path, list)
    gallery = load_json(img_path, list)
    for j, name in enumerate(gallery):
        if not isinstance(name, str):
            raise BenchmarkFormatError(f"{img_path.name}: item {j} is not an image name ({img_path})")
    in_gallery = set(gallery)
    # The test split has no public targets in some releases; treat them as optional there.
    need_target = split != "test"

    queries = []
    for i, e in enumerate(entries):
        ref = require_key(e, "candidate", cap_path, i, str)
        caps = require_str_list(e, "captions", cap_path, i)
        if len(caps) != 2:
            raise BenchmarkFormatError(
                f"{cap_path.name}: entry {i} key 'captions' should hold 2 captions, "
                f"holds {len(caps)} ({cap_path})"
            )
        targets: tuple[str, ...] = ()
        if need_target or "target" in e:
            targets = (require_key(e, "target", cap_path, i, str),)
        for image_id in (ref, *targets):
            if image_id not in in_gallery:
                raise BenchmarkFormatError(
                    f"{cap_path.name}: entry {i} names image {image_id!r}, which is not in {img_path.name}"
                )
        queries.append(
            Query(
                query_id=f"{category}-{i}",
                ref_id=ref,
                text=join_captions(caps[0], caps[1]),
                target_ids=targets,
                meta={"category": category, "captions": tuple(caps)},
            )
        )

    return Benchmark(
        name=f"fashioniq-{category}",
        split=split,
        queries=queries,
        gallery_ids=list(gallery),
        image_dir=Path(image_dir) if image_dir is not None else None,
        protocol="fashioniq",
        exclude_reference=False,
        image_suffixes=(".png", ".jpg", ".jpeg"),
        meta={"category": category, "captions_file": str(cap_path), "split_file": str(img_path)},
    )


def load_fashioniq_all(
    split: str, annotations_dir: str | Path, image_dir: str | Path | None = None
) -> dict[str, Benchmark]:
    """The three category benchmarks, keyed by category, in the order dress, shirt, toptee."""
    return {c: load_fashioniq(c, split, annotations_dir, image_dir) for c in CATEGORIES}
