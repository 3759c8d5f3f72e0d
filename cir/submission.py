"""Test-server submission files (CIRR, CIRCO) and predictions files.

Test splits withhold their ground truth; numbers come from uploading rankings to the
benchmark's server, which rejects (or silently mis-scores) a malformed file. So the
writers check everything the servers assume before writing, and write atomically
(`cir.outputs.write_json_atomic`, in the key order built: "version" and "metric"
first) so a crash never leaves half a file behind:
* CIRR (cirr.cs.umd.edu): two files, {"version": "rc2", "metric": "recall",
  "<pairid>": [top 50 image names]} and the same with "metric": "recall_subset" and
  the top 3 within `img_set.members`; the reference never appears (the server ranks
  without it, as CIRR's protocol does); ids unique; every test query present.
* CIRCO (circo.micc.unifi.it): {"<query id>": [top 50 int COCO ids]}, unique ids,
  every query present (the format of CIRCO's submission_examples/).

A predictions file is JSON {query_id: [ranked image ids]}; CIRCO's submission format
is one, and CIRR's server format is read too (its "version"/"metric" keys skipped).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cir.benchmarks.base import Benchmark
from cir.outputs import write_json_atomic
from cir.storage import Where, resolve

CIRR_VERSION = "rc2"
SERVER_KEYS = ("version", "metric")


def predictions_from_ranked(bench: Benchmark, ranked: np.ndarray) -> dict[str, list[str]]:
    """{query_id: [image ids]} from rankings [Q, K] of gallery rows (-1 padding dropped)."""
    ranked = np.asarray(ranked)
    if len(ranked) != len(bench.queries):
        raise ValueError(f"{len(ranked)} rankings for {len(bench.queries)} queries")
    gallery = np.asarray(bench.gallery_ids, dtype=object)
    return {
        q.query_id: gallery[row[row >= 0]].tolist() for q, row in zip(bench.queries, ranked)
    }


def refuse_repeats(qid: str, ids: Sequence[str], what: str) -> None:
    """ValueError naming the query and the image when a ranked list holds an id twice
    (the official evaluation code stops on it; a server would count it twice)."""
    seen: set = set()
    for rank, i in enumerate(ids, 1):
        if i in seen:
            raise ValueError(f"{what}: query {qid} lists image {i!r} more than once "
                             f"(again at rank {rank}); each image may appear once")
        seen.add(i)


def _checked_list(qid: str, ids: Sequence, k: int, what: str) -> list[str]:
    ids = [str(i) for i in ids]
    refuse_repeats(qid, ids, what)
    if len(ids) < k:
        raise ValueError(f"{what}: query {qid} lists {len(ids)} images, the server expects {k}")
    return ids[:k]


# ---- CIRR -------------------------------------------------------------------------------
def cirr_submissions(
    bench: Benchmark,
    recall: Mapping[str, Sequence[str]],
    recall_subset: Mapping[str, Sequence[str]],
    k: int = 50,
    k_subset: int = 3,
) -> tuple[dict, dict]:
    """The two checked CIRR server dicts (lists longer than k / k_subset are cut)."""
    if bench.protocol != "cirr":
        raise ValueError(f"{bench.name} is not CIRR")
    bench.check_query_ids(recall, "CIRR recall submission")
    bench.check_query_ids(recall_subset, "CIRR recall_subset submission")
    recall = {str(key): v for key, v in recall.items()}
    recall_subset = {str(key): v for key, v in recall_subset.items()}
    gallery = set(bench.gallery_ids)
    k = min(k, len(gallery) - 1)
    main = {"version": CIRR_VERSION, "metric": "recall"}
    subset = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for q in bench.queries:
        ids = _checked_list(q.query_id, recall[q.query_id], k, "CIRR recall submission")
        sub = _checked_list(
            q.query_id, recall_subset[q.query_id],
            min(k_subset, len(set(q.subset_ids)) - 1), "CIRR recall_subset submission",
        )
        for name, lst in (("recall", ids), ("recall_subset", sub)):
            if q.ref_id in lst:
                raise ValueError(
                    f"CIRR {name} submission: query {q.query_id} lists its reference {q.ref_id!r}; "
                    "CIRR ranks without the reference"
                )
        bad = [i for i in ids if i not in gallery]
        if bad:
            raise ValueError(f"CIRR recall submission: query {q.query_id} lists {bad[0]!r}, "
                             f"not an image of the {bench.split} split")
        bad = [i for i in sub if i not in q.subset_ids]
        if bad:
            raise ValueError(f"CIRR recall_subset submission: query {q.query_id} lists {bad[0]!r}, "
                             "not a member of its img_set")
        main[q.query_id] = ids
        subset[q.query_id] = sub
    return main, subset


def write_cirr_submission(
    bench: Benchmark,
    recall: Mapping[str, Sequence[str]],
    recall_subset: Mapping[str, Sequence[str]],
    path,
    subset_path=None,
) -> tuple[Where, Where]:
    """Check and write both CIRR files (local paths or `cir.storage` URIs); the subset
    file defaults to `subset_<name>` beside it."""
    main, subset = cirr_submissions(bench, recall, recall_subset)
    path = resolve(path)
    subset_path = resolve(subset_path) if subset_path else path.parent / f"subset_{path.name}"
    return (write_json_atomic(path, main, indent=None, sort_keys=False),
            write_json_atomic(subset_path, subset, indent=None, sort_keys=False))


# ---- CIRCO ------------------------------------------------------------------------------
def circo_submission(bench: Benchmark, predictions: Mapping[str, Sequence], k: int = 50) -> dict:
    """Checked CIRCO server dict {"<query id>": [k int image ids]} (longer lists are cut)."""
    if bench.protocol != "circo":
        raise ValueError(f"{bench.name} is not CIRCO")
    bench.check_query_ids(predictions, "CIRCO submission")
    predictions = {str(key): v for key, v in predictions.items()}
    known = set(bench.gallery_ids)
    out = {}
    for q in bench.queries:
        ids = _checked_list(q.query_id, predictions[q.query_id], k, "CIRCO submission")
        bad = [i for i in ids if not i.isdigit() or (known and i not in known)]
        if bad:
            raise ValueError(f"CIRCO submission: query {q.query_id} lists {bad[0]!r}, "
                             "not a COCO image id" + (" of the gallery" if known else ""))
        out[q.query_id] = [int(i) for i in ids]
    return out


def write_circo_submission(bench: Benchmark, predictions: Mapping[str, Sequence], path) -> Where:
    return write_json_atomic(path, circo_submission(bench, predictions), indent=None, sort_keys=False)


# ---- reading ------------------------------------------------------------------------------
def read_json_object(path: str | Path, what: str = "predictions file",
                     expected: str = "{query_id: [image ids]}") -> dict:
    """The JSON object in a file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {expected}")
    return data


def read_predictions(path: str | Path, bench: Benchmark | None = None) -> dict[str, list[str]]:
    """{query_id: [image ids as str]} from a predictions or server submission file.

    With `bench`, every query of the split must be present and no other.
    """
    data = read_json_object(path)
    out: dict[str, list[str]] = {}
    for key, value in data.items():
        if key in SERVER_KEYS and isinstance(value, str):
            continue
        if not isinstance(value, list) or not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{path.name}: query {key!r} should map to a list of image ids ({path})")
        out[str(key)] = [str(v) for v in value]
    if bench is not None:
        bench.check_query_ids(out, f"{path.name}")
    return out
