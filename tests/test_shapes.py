"""The shapes world: captions, rendering, edits and their texts, corpus and benchmark writers."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cir.data import shapes_corpus
from cir.data.edits import (
    KINDS, Edit, apply_edit, apply_edits, diff, edit_text, modification_texts, random_edit,
    valid_kinds,
)
from cir.data.shapes import (
    CELLS, COLOURS, RGB, SHAPES, Obj, Scene, caption, parse_caption, random_scene, render,
)
from cir.data.shapes_corpus import read_benchmark_split, write_benchmark, write_corpus
from cir.schemas import CORPUS, TRIPLETS

RED_CIRCLE = Obj("circle", "red", "small", "top left")
BLUE_SQUARE = Obj("square", "blue", "large", "centre")
SCENE = Scene((BLUE_SQUARE, RED_CIRCLE))  # deliberately out of cell order


def _pairs(seed: int, n: int):
    """Random (ref, tgt) pairs: chains of 1-4 random edits, and unrelated scenes."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        ref = random_scene(rng, 1, 6)
        if i % 4 == 0:
            tgt = random_scene(rng, 1, 6)
        else:
            tgt = ref
            for _ in range(int(rng.integers(1, 5))):
                tgt = apply_edit(tgt, random_edit(rng, tgt, max_objects=6))
        yield ref, tgt


# ------------------------------------------------------------------ scenes, captions

def test_scene_is_canonical():
    assert SCENE.objects == (RED_CIRCLE, BLUE_SQUARE)
    assert SCENE == Scene((RED_CIRCLE, BLUE_SQUARE))
    assert hash(SCENE) == hash(Scene((RED_CIRCLE, BLUE_SQUARE)))
    with pytest.raises(ValueError):
        Scene((RED_CIRCLE, RED_CIRCLE.replace(colour="blue")))  # two objects in one cell
    with pytest.raises(ValueError):
        Scene(())
    with pytest.raises(ValueError):
        Obj("hexagon", "red", "small", "top left")


def test_caption_exact_and_round_trip():
    assert caption(SCENE) == "a small red circle at the top left, a large blue square in the centre"
    side = Scene((Obj("star", "green", "large", "left"),
                  Obj("triangle", "orange", "small", "right")))
    assert caption(side) == "a large green star on the left, a small orange triangle on the right"
    rng = np.random.default_rng(0)
    for _ in range(2000):
        s = random_scene(rng, 1, 9)
        assert parse_caption(caption(s)) == s


@pytest.mark.parametrize("text", [
    "a dog on a sofa",
    "",
    "a large blue square in the centre, a small red circle at the top left",  # not cell order
    "a small red circle in the top left",  # wrong preposition
    "a small red circle at the top left.",
    "a small red circle at the top left, a large blue square at the top left",
    "A small red circle at the top left",
    None,
])
def test_parse_caption_rejects(text):
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption(text)


def test_random_scene_bounds():
    rng = np.random.default_rng(1)
    counts = {len(random_scene(rng, 2, 3).objects) for _ in range(200)}
    assert counts == {2, 3}
    with pytest.raises(ValueError):
        random_scene(rng, 0, 3)


# ------------------------------------------------------------------------ rendering

def test_render_size_and_pixels():
    img = render(SCENE, 64)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert render(SCENE, 96).size == (96, 96)
    a = np.asarray(img)
    assert np.array_equal(a, np.asarray(render(SCENE, 64)))  # deterministic
    # the centre of the large square's cell has the square's colour
    assert np.abs(a[32, 32].astype(int) - RGB["blue"]).max() < 10
    # every shape, colour and size change shows in the pixels
    for obj in (BLUE_SQUARE.replace(shape=s) for s in SHAPES if s != "square"):
        assert not np.array_equal(a, np.asarray(render(Scene((RED_CIRCLE, obj)), 64)))
    for change in ({"colour": "green"}, {"size": "large"}, {"cell": "bottom"}):
        other = Scene((RED_CIRCLE.replace(**change), BLUE_SQUARE))
        assert not np.array_equal(a, np.asarray(render(other, 64)))
    # shapes of one colour and size differ from each other, not just from the square
    single = [np.asarray(render(Scene((Obj(s, "red", "large", "centre"),)), 64)) for s in SHAPES]
    for i in range(len(SHAPES)):
        for j in range(i):
            assert np.abs(single[i].astype(int) - single[j]).sum() > 255 * 20


def test_render_seed_varies_pixels_not_content():
    a, b = np.asarray(render(SCENE, 64, seed=0)), np.asarray(render(SCENE, 64, seed=7))
    assert not np.array_equal(a, b)
    assert np.abs(a.astype(int) - b).mean() < 10  # a slight variation only


# ---------------------------------------------------------------------------- edits

EXACT = [
    (Edit("colour", RED_CIRCLE, "blue"), "make the small red circle at the top left blue",
     "a small blue circle at the top left, a large blue square in the centre"),
    (Edit("shape", BLUE_SQUARE, "triangle"),
     "change the large blue square in the centre into a triangle",
     "a small red circle at the top left, a large blue triangle in the centre"),
    (Edit("size", RED_CIRCLE, "large"), "make the small red circle at the top left large",
     "a large red circle at the top left, a large blue square in the centre"),
    (Edit("add", Obj("star", "green", "small", "bottom right")),
     "add a small green star at the bottom right",
     "a small red circle at the top left, a large blue square in the centre, "
     "a small green star at the bottom right"),
    (Edit("remove", BLUE_SQUARE), "remove the large blue square in the centre",
     "a small red circle at the top left"),
    (Edit("move", RED_CIRCLE, "bottom"),
     "move the small red circle from the top left to the bottom",
     "a large blue square in the centre, a small red circle at the bottom"),
]


@pytest.mark.parametrize("edit,text,target", EXACT, ids=[e.kind for e, _, _ in EXACT])
def test_each_edit_kind_applied_and_described_exactly(edit, text, target):
    tgt = apply_edit(SCENE, edit)
    assert caption(tgt) == target
    assert edit_text([edit]) == text
    assert diff(SCENE, tgt) == [edit]
    assert modification_texts(SCENE, tgt)[0] == text


def test_joined_texts_and_reverse():
    two = [EXACT[0][0], EXACT[4][0]]
    tgt = apply_edits(SCENE, two)
    assert modification_texts(SCENE, tgt) == (
        "make the small red circle at the top left blue and "
        "remove the large blue square in the centre",
        "make the small blue circle at the top left red and "
        "add a large blue square in the centre",
    )
    three = [EXACT[0][0], EXACT[1][0], EXACT[3][0]]
    assert edit_text(three) == (
        "make the small red circle at the top left blue, change the large blue square in "
        "the centre into a triangle and add a small green star at the bottom right")
    # several attributes of one object: one edit each, each naming the object as it is then
    tgt = Scene((RED_CIRCLE.replace(colour="green", shape="star", size="large"), BLUE_SQUARE))
    assert modification_texts(SCENE, tgt)[0] == (
        "make the small red circle at the top left green, change the small green circle "
        "at the top left into a star and make the small green star at the top left large")
    with pytest.raises(ValueError, match="nothing to describe"):
        modification_texts(SCENE, SCENE)


@pytest.mark.parametrize("scene,edit", [
    (SCENE, Edit("add", Obj("star", "red", "small", "centre"))),  # occupied
    (SCENE, Edit("move", RED_CIRCLE, "centre")),  # occupied
    (SCENE, Edit("remove", RED_CIRCLE.replace(colour="green"))),  # not in the scene
    (Scene((RED_CIRCLE,)), Edit("remove", RED_CIRCLE)),  # would empty the scene
])
def test_invalid_edits_raise(scene, edit):
    with pytest.raises(ValueError):
        apply_edit(scene, edit)


def test_edit_rejects_no_op_and_bad_values():
    with pytest.raises(ValueError):
        Edit("colour", RED_CIRCLE, "red")
    with pytest.raises(ValueError):
        Edit("colour", RED_CIRCLE, "large")
    with pytest.raises(ValueError):
        Edit("recolour", RED_CIRCLE, "blue")


def test_random_edits_are_valid_and_cover_all_kinds():
    rng = np.random.default_rng(2)
    kinds = set()
    for _ in range(3000):
        s = random_scene(rng, 1, 4)
        e = random_edit(rng, s, max_objects=4)
        assert e.kind in valid_kinds(s, 4)
        t = apply_edit(s, e)  # raises if invalid
        assert 1 <= len(t.objects) <= 4 and t != s
        assert diff(s, t) == [e]  # a single edit is recovered exactly
        assert modification_texts(s, t)[0] == edit_text([e])
        kinds.add(e.kind)
    assert kinds == set(KINDS)
    assert "remove" not in valid_kinds(Scene((RED_CIRCLE,)))
    full = Scene(tuple(Obj("circle", "red", "small", c) for c in CELLS))
    assert {"add", "move"}.isdisjoint(valid_kinds(full, max_objects=9))


def test_diff_names_every_difference():
    sizes = []
    for ref, tgt in _pairs(3, 4000):
        edits = diff(ref, tgt)
        assert apply_edits(ref, edits) == tgt
        assert (len(edits) == 0) == (ref == tgt)
        assert apply_edits(tgt, diff(tgt, ref)) == ref
        assert diff(ref, tgt) == edits  # deterministic
        sizes.append(len(edits))
    assert max(sizes) >= 5 and sizes.count(2) > 100  # multi-edit pairs were exercised


def test_diff_pairs_moves_in_cell_order():
    a = Obj("star", "red", "small", "top left")
    b = Obj("star", "red", "small", "top")
    ref = Scene((a, b))
    tgt = Scene((a.replace(cell="bottom left"), b.replace(cell="bottom")))
    assert diff(ref, tgt) == [Edit("move", a, "bottom left"), Edit("move", b, "bottom")]


# ---------------------------------------------------------------------- human texts

def test_phrasing_arguments():
    with pytest.raises(ValueError, match="unknown phrasing"):
        edit_text([EXACT[0][0]], phrasing="poetic")
    with pytest.raises(ValueError, match="rng"):
        edit_text([EXACT[0][0]], phrasing="human")


def test_human_texts_are_varied_deterministic_and_held_out():
    for edit, synthetic, _ in EXACT:
        texts = {edit_text([edit], "human", np.random.default_rng(i), scene=SCENE)
                 for i in range(60)}
        assert len(texts) >= 3, (edit.kind, texts)
        assert synthetic not in texts
        for t in texts:
            if edit.kind in ("colour", "shape"):
                assert edit.new in t
    a = edit_text([EXACT[0][0], EXACT[3][0]], "human", np.random.default_rng(5), scene=SCENE)
    b = edit_text([EXACT[0][0], EXACT[3][0]], "human", np.random.default_rng(5), scene=SCENE)
    assert a == b
    synthetic = {edit_text(diff(r, t)) for r, t in _pairs(4, 500) if r != t}
    human = {modification_texts(r, t, "human", np.random.default_rng(0))[0]
             for r, t in _pairs(4, 500) if r != t}
    assert not synthetic & human


def test_human_references_without_position_are_unique():
    """A reference with no position ("get rid of the big blue square") must match exactly
    the removed object. Remove texts name nothing but the object, so we can check it."""
    rng = np.random.default_rng(6)
    size_words = {"small": {"small", "little", "tiny"}, "large": {"large", "big"}}
    any_size = size_words["small"] | size_words["large"]
    positions = {"top", "bottom", "left", "right", "centre", "middle"}
    short = 0
    while short < 100:
        s = random_scene(rng, 2, 4)
        obj = s.objects[int(rng.integers(len(s.objects)))]
        text = edit_text([Edit("remove", obj)], "human", rng, scene=s)
        words = set(text.replace("-", " ").split())
        if words & positions:
            continue
        short += 1
        matches = [o for o in s.objects
                   if (o.colour in words or not words & set(COLOURS))
                   and (o.shape in words or not words & set(SHAPES))
                   and (words & size_words[o.size] or not words & any_size)]
        assert matches == [obj], (caption(s), text)


# --------------------------------------------------------------------------- corpus

def _scenes(table):
    return [parse_caption(c) for c in table["caption"].to_pylist()]


def test_corpus_rows_families_and_determinism(tmp_path):
    out = write_corpus(tmp_path / "c", 200, seed=0, family_size=8, rows_per_shard=64)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert pq.read_table(files[0]).schema.equals(CORPUS)
    table = pq.read_table(out)
    assert table.num_rows == 200
    assert table["image_id"].to_pylist() == [f"shapes-{i:06d}" for i in range(200)]
    scenes = _scenes(table)
    assert len(set(scenes)) == 200
    img = Image.open(io.BytesIO(table["image"][0].as_py()))
    assert img.size == (64, 64) and img.format == "PNG"
    families: dict[str, list[Scene]] = {}
    for s, cat in zip(scenes, table["category"].to_pylist()):
        families.setdefault(cat, []).append(s)
    assert set(families) == {f"family-{i:04d}" for i in range(len(families))}
    assert len(families) == 25  # 200 / 8
    for members in families.values():
        base = members[0]
        for m in members[1:]:
            assert 1 <= len(diff(base, m)) <= 3
    again = pq.read_table(write_corpus(tmp_path / "c2", 200, seed=0, rows_per_shard=64))
    assert again.equals(table)
    other = pq.read_table(write_corpus(tmp_path / "c3", 200, seed=1))
    assert other["caption"].to_pylist() != table["caption"].to_pylist()
    assert {shapes_corpus.partition(s) for s in scenes} == {"corpus"}


def test_corpus_arguments_and_atomic_write(tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        write_corpus(tmp_path / "x", 0)
    out = write_corpus(tmp_path / "c", 5, family_size=1)
    assert pq.read_table(out)["category"].to_pylist() == [f"family-{i:04d}" for i in range(5)]
    with pytest.raises(FileExistsError):
        write_corpus(out, 5)
    write_corpus(out, 7, overwrite=True)
    assert pq.read_table(out).num_rows == 7

    calls = []

    def failing_png(*args):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return b"png"

    monkeypatch.setattr(shapes_corpus, "_png", failing_png)
    with pytest.raises(RuntimeError):
        write_corpus(tmp_path / "crash", 10, rows_per_shard=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half-written


def test_cli_writes_a_corpus(tmp_path, capsys):
    shapes_corpus.main(["corpus", str(tmp_path / "cli"), "--n", "12", "--seed", "3"])
    assert pq.read_table(tmp_path / "cli").num_rows == 12
    assert "wrote 12 images" in capsys.readouterr().out


# ------------------------------------------------------------------------ benchmark

@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("b") / "bench", seed=1,
                           n_train=40, n_val=30, n_test=30)


def test_benchmark_layout_and_manifest(bench):
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["phrasing"] == "human"
    assert {k: v["queries"] for k, v in manifest["splits"].items()} == {
        "train": 40, "val": 30, "test": 30}
    for split in ("train", "val", "test"):
        gallery, queries = read_benchmark_split(bench, split)
        assert gallery.schema.equals(CORPUS) and queries.schema.equals(TRIPLETS)
        assert manifest["splits"][split]["gallery"] == gallery.num_rows
        assert all(i.startswith(f"{split}-") for i in gallery["image_id"].to_pylist())


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_benchmark_targets_are_exact_and_unique(bench, split):
    gallery, queries = read_benchmark_split(bench, split)
    scene_of = dict(zip(gallery["image_id"].to_pylist(), _scenes(gallery)))
    group_of = dict(zip(gallery["image_id"].to_pylist(), gallery["category"].to_pylist()))
    assert len(set(scene_of.values())) == len(scene_of)  # every scene once per split
    n_edits = []
    for q in queries.to_pylist():
        ref, tgt = scene_of[q["ref_id"]], scene_of[q["tgt_id"]]
        edits = diff(ref, tgt)
        n_edits.append(len(edits))
        assert [i for i, s in scene_of.items() if s == apply_edits(ref, edits)] == [q["tgt_id"]]
        forward, reverse = modification_texts(ref, tgt)
        assert q["text"] != forward and q["reverse_text"] != reverse
        assert (q["source"], q["generator"], q["similarity"]) == ("human", "shapes-human", None)
        # hard negatives: the query's group holds other images an edit or two from ref or tgt
        group = [s for i, s in scene_of.items()
                 if group_of[i] == group_of[q["ref_id"]] and s not in (ref, tgt)]
        assert len(group) == 3
        near = [min(len(diff(ref, s)), len(diff(tgt, s))) for s in group]
        assert set(near) <= {1, 2} and near.count(1) >= 2, near
    assert set(n_edits) == {1, 2} and n_edits.count(1) > n_edits.count(2)
    # gallery order is shuffled: ids give no hint of which image is the target
    adjacent = sum(int(t[-6:]) == int(r[-6:]) + 1
                   for r, t in zip(queries["ref_id"].to_pylist(), queries["tgt_id"].to_pylist()))
    assert adjacent < queries.num_rows / 4


def test_benchmark_is_deterministic_and_apart_from_corpora(bench, tmp_path):
    again = write_benchmark(tmp_path / "b2", seed=1, n_train=40, n_val=30, n_test=30)
    for split in ("train", "val", "test"):
        for a, b in zip(read_benchmark_split(bench, split), read_benchmark_split(again, split)):
            assert a.equals(b)
    corpus = set(_scenes(pq.read_table(write_corpus(tmp_path / "c", 300, seed=1))))
    splits = [set(_scenes(read_benchmark_split(bench, s)[0])) for s in ("train", "val", "test")]
    for i, split in enumerate(splits):
        assert not corpus & split
        assert all(not split & other for other in splits[:i])
        assert {shapes_corpus.partition(s) for s in split} == {("train", "val", "test")[i]}


def test_read_benchmark_split_errors(bench, tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        read_benchmark_split(bench, "dev")
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_benchmark_split(tmp_path, "val")
    broken = tmp_path / "broken"
    (broken / "val").mkdir(parents=True)
    (broken / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="gallery"):
        read_benchmark_split(broken, "val")
    assert Path(bench).is_dir()
