"""Training examples from benchmark train splits (`benchmark_triplets`): CIRR and
FashionIQ on tiny fake releases in the real file formats with PNG/JPEG images, shapes
through its reader; their images encoded by Ray Data into the run's feature cache (one
and two encoder actors); the stage config's validation; `build_examples` dispatching."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cir.benchmarks import load_cirr, load_fashioniq, load_fashioniq_all
from cir.benchmarks.fashioniq import join_captions
from cir.config import load_config
from cir.embed import EmbedSettings, Embedder
from cir.outputs import read_table
from cir.schemas import embedding_matrix
from cir.train.config import DataConfig, TrainConfig
from cir.train.run import build_examples
from cir.train.sources import EXAMPLE_COLUMNS, benchmark_triplets
from conftest import REPO

VISION = "cir-tiny"
pytestmark = pytest.mark.usefixtures("ray_session")


def examples(benches, cache, **kwargs):
    return benchmark_triplets(benches, VISION, cache, EmbedSettings(batch_size=4), **kwargs)


def _image(path: Path, k: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = ((37 * k) % 256, (91 * k + 40) % 256, (53 * k + 120) % 256)
    im = Image.new("RGB", (24, 24), rgb)
    im.paste((255 - rgb[0], rgb[2], rgb[1]), (2 + k % 8, 3, 12 + k % 8, 15))
    im.save(path)


def _write(root: Path, files: dict) -> None:
    for rel, obj in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj))


def fake_cirr_train(root: Path, n_images: int = 8) -> tuple[Path, Path]:
    """CIRR rc2 train: images under train/<dir>/ as in the release; 4 queries."""
    names = [f"train-{i}-0-img{i % 2}" for i in range(n_images)]
    rel = {n: f"./train/{i % 3}/{n}.png" for i, n in enumerate(names)}
    for i, n in enumerate(names):
        _image(root / "images" / rel[n], i)
    entries = []
    for k, (ref, tgt) in enumerate([(0, 1), (2, 3), (1, 4), (5, 0)]):
        members = [names[ref], names[tgt]] + [names[(ref + 2 + j) % n_images] for j in range(4)]
        entries.append({"pairid": 500 + k, "reference": names[ref], "target_hard": names[tgt],
                        "target_soft": {names[tgt]: 1.0}, "caption": f"make it look like {k}",
                        "img_set": {"id": k, "members": members, "reference_rank": 0, "target_rank": 1}})
    _write(root / "ann", {"captions/cap.rc2.train.json": entries,
                          "image_splits/split.rc2.train.json": rel})
    return root / "ann", root / "images"


def fake_fashioniq_train(root: Path) -> tuple[Path, Path]:
    """FashionIQ train for the three categories; one image folder, .png and .jpg files,
    and gallery images no query uses."""
    files, k = {}, 0
    for c, cat in enumerate(("dress", "shirt", "toptee")):
        names = [f"B0{cat[:2].upper()}{i}" for i in range(4)]
        for i, n in enumerate(names):
            _image(root / "images" / f"{n}{'.jpg' if i % 2 else '.png'}", k)
            k += 1
        files[f"captions/cap.{cat}.train.json"] = [
            {"target": names[1], "candidate": names[0], "captions": [f"is {cat}dier.", "has sleeves"]},
            {"target": names[0], "candidate": names[2], "captions": ["is red?", f"longer {c}"]},
        ]
        files[f"image_splits/split.{cat}.train.json"] = names
    _write(root / "ann", files)
    return root / "ann", root / "images"


def _embed(bench, ids) -> np.ndarray:
    """What the embedding stage gives, computed here in this process."""
    table = pa.table({"image_id": list(ids), "image": [bench.image_bytes(i) for i in ids]})
    return embedding_matrix(Embedder(VISION, threads=1)(table).column("embedding"))


def _check_features(table, benches) -> None:
    queries = [(b, q) for b in benches for q in b.queries]
    assert table.num_rows == len(queries)
    assert table.column("text").to_pylist() == [q.text for _, q in queries]
    assert table.column("reverse_text").null_count == table.num_rows
    for col, ids in (("ref_feat", [q.ref_id for _, q in queries]),
                     ("tgt_feat", [q.target_ids[0] for _, q in queries])):
        np.testing.assert_allclose(embedding_matrix(table.column(col)), _embed(benches[0], ids), atol=1e-5)


def test_cirr_train_split_gives_examples_of_the_right_images(tmp_path):
    ann, images = fake_cirr_train(tmp_path)
    bench = load_cirr("train", ann, images)
    table = examples(bench, tmp_path / "features")
    assert tuple(table.column_names) == EXAMPLE_COLUMNS
    assert set(table.column("source").to_pylist()) == {"cirr:train"}
    assert table.column("text").to_pylist()[0] == "make it look like 0"
    _check_features(table, [bench])
    assert examples(bench, tmp_path / "features", limit=2).num_rows == 2


def test_fashioniq_all_categories_encode_each_used_image_once(tmp_path):
    ann, images = fake_fashioniq_train(tmp_path)
    benches = list(load_fashioniq_all("train", ann, images).values())
    table = examples(benches, tmp_path / "features")
    for cat in ("dress", "shirt", "toptee"):  # per category: 3 of its 4 images are used
        [folder] = (tmp_path / "features").glob(f"fashioniq-{cat}-train-*")
        cache = read_table(folder)
        assert sorted(cache.column("image_id").to_pylist()) == [f"B0{cat[:2].upper()}{i}" for i in range(3)]
    assert table.column("text").to_pylist()[0] == join_captions("is dressdier.", "has sleeves")
    assert table.column("source").to_pylist() == [f"fashioniq-{c}:train" for c in ("dress", "shirt", "toptee")
                                                  for _ in range(2)]
    _check_features(table, benches)
    assert examples(benches, tmp_path / "features", limit=3).column("source").to_pylist() == [
        "fashioniq-dress:train", "fashioniq-dress:train", "fashioniq-shirt:train"]


def _embedder_actors() -> set:
    import ray
    from ray.util.state import list_actors

    # The session's own Ray: another instance on the machine (a fault test's job) would make
    # an address-less call refuse to choose.
    return {a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000)
            if a.class_name == "MapWorker(MapBatches(Embedder))"}


def test_the_feature_cache_is_built_by_two_encoder_actors_and_reused(tmp_path, capsys):
    from cir.benchmarks import load_shapes
    from cir.data.shapes_corpus import write_benchmark
    from cir.train.features import benchmark_features

    bench = load_shapes("val", write_benchmark(tmp_path / "bench", seed=4, n_train=4, n_val=40, n_test=4))
    two = EmbedSettings(batch_size=8, num_actors=2, cpus_per_actor=0.5)
    before = _embedder_actors()
    f = benchmark_features(bench, bench.gallery_ids, VISION, tmp_path / "features", two)
    assert len(_embedder_actors() - before) == 2 and not f.failed  # two actors (pids) did the work
    np.testing.assert_allclose(f.vectors[[f.index[i] for i in bench.gallery_ids]],
                               _embed(bench, bench.gallery_ids), atol=1e-5)
    [cache] = (tmp_path / "features").glob("shapes-val-*")
    assert json.loads((cache / "_SUCCESS.json").read_text())["rows"] == len(bench.gallery_ids)
    stamp = (cache / "_SUCCESS.json").stat().st_mtime_ns
    again = benchmark_features(bench, bench.gallery_ids, VISION, tmp_path / "features", two)
    assert "reusing" in capsys.readouterr().err and (cache / "_SUCCESS.json").stat().st_mtime_ns == stamp
    assert np.array_equal(again.vectors, f.vectors)
    # other images (or another vision model) are not served from it, but get a cache of their own
    fewer = benchmark_features(bench, bench.gallery_ids[:10], VISION, tmp_path / "features", two)
    assert len(fewer.index) == 10 and "encoding 10 images" in capsys.readouterr().err
    assert len(list((tmp_path / "features").glob("shapes-val-*"))) == 2


def test_missing_and_unreadable_images_are_named_and_skipped(tmp_path, capsys):
    ann, images = fake_cirr_train(tmp_path)
    (images / "train/2/train-5-0-img1.png").unlink()          # reference of query 3
    (images / "train/1/train-4-0-img0.png").write_bytes(b"no png")  # target of query 2
    table = examples(load_cirr("train", ann, images), tmp_path / "features")
    assert table.column("text").to_pylist() == ["make it look like 0", "make it look like 1"]
    err = capsys.readouterr().err
    assert "WARNING: 2 of 6 images could not be read, so 2 of 4 queries are left out" in err
    assert "train-5-0-img1" in err and "train-4-0-img0" in err and "not a readable image" in err

    for png in images.rglob("*.png"):
        png.unlink()
    with pytest.raises(FileNotFoundError, match="first: train-0-0-img0.*no training example is left"):
        examples(load_cirr("train", ann, images), tmp_path / "features")
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere does not exist"):
        examples(load_cirr("train", ann, tmp_path / "nowhere"), tmp_path / "features")


def test_queries_without_targets_are_an_error(tmp_path):
    ann, images = fake_fashioniq_train(tmp_path)
    cap = ann / "captions" / "cap.dress.test.json"
    cap.write_text(json.dumps([{"candidate": "B0DR0", "captions": ["a", "b"]}]))
    (ann / "image_splits" / "split.dress.test.json").write_text(json.dumps(["B0DR0"]))
    with pytest.raises(ValueError, match="1 of 1 queries have no target"):
        examples(load_fashioniq("dress", "test", ann, images), tmp_path / "features")


@pytest.mark.parametrize("fields, message", [
    ({"benchmark": "circo", "annotations": "a", "images": "i"}, "'circo' has no train split"),
    ({"benchmark": "flickr"}, "benchmark must be one of shapes, cirr, fashioniq, got 'flickr'"),
    ({"benchmark": "cirr", "images": "i"}, r"stages\[s\].data.annotations is required for benchmark 'cirr'"),
    ({"benchmark": "cirr", "annotations": "a"}, r"stages\[s\].data.images is required for benchmark 'cirr'"),
    ({"benchmark": "fashioniq", "annotations": "a"}, "data.images is required for benchmark 'fashioniq'"),
    ({"benchmark": "fashioniq", "annotations": "a", "images": "i", "category": "hat"},
     "category must be one of dress, shirt, toptee, all"),
    ({"benchmark": "fashioniq-dress"}, "write benchmark: fashioniq and category: dress"),
])
def test_data_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**fields).validate("stages[s]")


def test_data_config_defaults_and_other_sources_still_validate():
    DataConfig().validate("s")  # shapes, as before
    DataConfig(benchmark="cirr", annotations="a", images="i").validate("s")
    DataConfig(source="synth", synth_dir="x", benchmark="circo").validate("s")  # benchmark unused


def test_build_examples_from_the_example_cirr_config(tmp_path):
    ann, images = fake_cirr_train(tmp_path / "cirr")
    cfg = load_config(TrainConfig, REPO / "configs" / "train" / "cirr_finetune.yaml")
    data = cfg.stages[0].data
    with pytest.raises(ValueError, match="annotations is required"):
        data.validate("stages[finetune]")
    data.annotations, data.images = str(ann), str(images)
    data.validate("stages[finetune]")
    table = build_examples(data, VISION, tmp_path / "features")
    _check_features(table, [load_cirr("train", ann, images)])

    ann, images = fake_fashioniq_train(tmp_path / "fiq")
    data = DataConfig(benchmark="fashioniq", category="shirt", annotations=str(ann), images=str(images),
                      limit=1)
    data.validate("s")
    assert build_examples(data, VISION, tmp_path / "features").column("source").to_pylist() == [
        "fashioniq-shirt:train"]

    from cir.benchmarks import load_shapes
    from cir.data.shapes_corpus import write_benchmark

    root = write_benchmark(tmp_path / "shapes", seed=5, n_train=12, n_val=4, n_test=4)
    shapes = build_examples(DataConfig(benchmark_dir=str(root), limit=10), VISION, tmp_path / "features")
    queries = load_shapes("train", root).queries[:10]
    assert shapes.column("source").to_pylist() == ["shapes:train"] * 10
    assert shapes.column("reverse_text").to_pylist() == [q.meta["reverse_text"] for q in queries]
    assert all(shapes.column("reverse_text").to_pylist())
