"""jobs/shapes_ceiling.py: caption oracles far above image-only retrieval with cir-shapes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import shapes_ceiling  # noqa: E402


def test_recall_excludes_the_reference():
    gallery = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0.9, 0], [0, 0, 1]], np.float32)
    # query 0: the reference (0) would rank first; excluded, the target (1) is first
    assert shapes_ceiling.recall(queries, gallery, np.array([0, 0]), np.array([1, 1]), ks=(1, 2)) == \
        {"R@1": 50.0, "R@2": 100.0}


def test_caption_oracles_beat_image_only(tmp_path, capsys):
    from cir.data.shapes_corpus import write_benchmark

    write_benchmark(tmp_path / "bench", seed=3, n_train=20, n_val=20, n_test=60)
    assert shapes_ceiling.main(["--benchmark-dir", str(tmp_path / "bench")]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["recall"]
    assert out["queries"] == 60 and out["gallery"] == 300
    assert r["oracle:target-caption"]["R@1"] > r["image-only"]["R@1"] + 40
    assert r["oracle:caption-delta"]["R@1"] > r["image-only"]["R@1"] + 40
