"""jobs/shapes_ceiling.py: caption oracles far above image-only retrieval with cir-shapes."""
from __future__ import annotations

import json

from conftest import load_job

shapes_ceiling = load_job("shapes_ceiling")


def test_caption_oracles_beat_image_only(tmp_path, capsys):
    from cir.data.shapes_corpus import write_benchmark

    write_benchmark(tmp_path / "bench", seed=3, n_train=20, n_val=20, n_test=60)
    assert shapes_ceiling.main(["--benchmark-dir", str(tmp_path / "bench")]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["recall"]
    assert out["queries"] == 60 and out["gallery"] == 300
    assert r["oracle:target-caption"]["R@1"] > r["image-only"]["R@1"] + 40
    assert r["oracle:caption-delta"]["R@1"] > r["image-only"]["R@1"] + 40
