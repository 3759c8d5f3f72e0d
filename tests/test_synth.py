"""The synth job end to end under local Ray: shapes, an image folder, bad input, resume."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cir import schemas
from cir.data.edits import modification_texts
from cir.data.shapes import parse_caption
from cir.outputs import read_table
from cir.synth.pipeline import SynthRun
from conftest import shapes_synth_config as make_config


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("triplet_id")


def test_shapes_triplet_texts_are_the_exact_edit(shapes_synth):
    out, summary = shapes_synth
    triplets = read_table(out / "triplets")
    corpus = read_table(out / "corpus", columns=["image_id", "caption"]).to_pydict()
    captions = dict(zip(corpus["image_id"], corpus["caption"]))
    assert triplets.num_rows >= 100, "mining should find plenty of pairs in 200 images"
    assert summary.stages["triplets"].rows == triplets.num_rows
    for row in triplets.to_pylist():
        ref, tgt = parse_caption(captions[row["ref_id"]]), parse_caption(captions[row["tgt_id"]])
        assert (row["text"], row["reverse_text"]) == modification_texts(ref, tgt)
        assert row["source"] == "template" and row["generator"] == "template:shapes"
    assert len(set(triplets.column("triplet_id").to_pylist())) == triplets.num_rows


def test_tables_follow_the_contracts(shapes_synth):
    out, summary = shapes_synth
    emb = read_table(out / "embeddings")
    assert schemas.embeddings_metadata(emb.schema) == ("cir-shapes", 128)  # the model of configs/local.yaml
    assert make_config(out).encode.model == "cir-shapes"
    vectors = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert emb.num_rows == 200 and summary.bad_images == []
    pairs = read_table(out / "pairs")
    lo, hi = make_config(out).mine.band
    sims = pairs.column("similarity").to_numpy()
    assert ((sims >= lo) & (sims <= hi)).all()
    assert not any(a == b for a, b in zip(pairs.column("ref_id").to_pylist(), pairs.column("tgt_id").to_pylist()))
    for name in ("corpus", "embeddings", "pairs", "triplets"):
        assert (out / name / "_SUCCESS.json").is_file()


def test_resume_redoes_only_the_missing_stage(shapes_synth, tmp_path):
    out, _ = shapes_synth
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _sorted(read_table(copy / "triplets"))
    shutil.rmtree(copy / "triplets")
    summary = SynthRun(make_config(copy)).run()
    assert [name for name, r in summary.stages.items() if not r.skipped] == ["triplets"]
    assert _sorted(read_table(copy / "triplets")).equals(before)


def test_an_interrupted_triplets_stage_generates_only_the_pairs_it_had_not_written(
        shapes_synth, tmp_path, monkeypatch, capsys):
    """A crash after half the pairs' texts were written: the rerun keeps those rows (one is
    marked here to tell), deletes a file the crash cut short, generates the other half,
    and commits the same triplets as an undisturbed run; the store goes with the commit."""
    import cir.synth.pipeline as pipeline
    from cir.synth.triplets import generate_candidates

    out, _ = shapes_synth
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _sorted(read_table(copy / "triplets"))
    shutil.rmtree(copy / "triplets")

    def crash_halfway(backend, quality_filter, pairs, folder, rejected, generate, rows_per_file, store):
        generate_candidates(backend, quality_filter, pairs.slice(0, pairs.num_rows // 2), store, generate)
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(pipeline, "generate_triplets", crash_halfway)
    with pytest.raises(RuntimeError, match="killed halfway"):
        SynthRun(make_config(copy)).run()
    monkeypatch.undo()
    (store,) = (copy / pipeline.GENERATED).iterdir()
    first = sorted(store.glob("*.parquet"))[0]
    written = pq.read_table(first)
    kept = written.column("drop_reason").to_pylist().index("") if "drop_reason" in written.column_names else 0
    marked = written.column("triplet_id")[kept].as_py()
    texts = written.column("text").to_pylist()
    texts[kept] = "kept from the first run"
    pq.write_table(written.set_column(written.schema.get_field_index("text"), "text", pa.array(texts)), first)
    (store / "cut-short.parquet").write_bytes(first.read_bytes()[:100])
    capsys.readouterr()

    summary = SynthRun(make_config(copy)).run()
    assert [name for name, r in summary.stages.items() if not r.skipped] == ["triplets"]
    log = capsys.readouterr().err
    n = summary.stages["triplets"].extra["pairs"]
    assert f"{n // 2} of {n} pairs' texts kept from an interrupted run" in log
    assert "cut short" in log and not (copy / pipeline.GENERATED).exists()
    after = _sorted(read_table(copy / "triplets"))
    row = after.column("triplet_id").to_pylist().index(marked)
    assert after.column("text")[row].as_py() == "kept from the first run"
    assert after.drop_columns(["text"]).equals(before.drop_columns(["text"]))
    assert after.column("text").to_pylist()[:row] + after.column("text").to_pylist()[row + 1:] == \
        before.column("text").to_pylist()[:row] + before.column("text").to_pylist()[row + 1:]


def test_changed_settings_are_not_silently_reused(shapes_synth, tmp_path):
    out, _ = shapes_synth
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    with pytest.raises(RuntimeError, match="other settings"):
        SynthRun(make_config(copy, mine__k=3)).run()


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 24), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    colors = {"red": (220, 30, 30), "dark red": (150, 20, 20), "blue": (30, 30, 220),
              "dark blue": (20, 20, 150), "green": (30, 200, 30), "dark green": (20, 130, 20)}
    lines = []
    for i, (name, rgb) in enumerate(colors.items()):
        fname = f"img{i}.png" if i % 2 else f"sub/img{i}.jpg"
        (folder / fname).write_bytes(_png(rgb) if i % 2 else _jpeg(rgb))
        lines.append({"file": fname, "caption": f"a {name} square", "category": "squares"})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    lines.append({"file": "broken.png", "caption": "a broken file", "category": "squares"})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    return folder


def test_image_folder_with_a_corrupt_file(ray_session, image_folder, tmp_path):
    cfg = make_config(tmp_path / "out", corpus__source=str(image_folder),
                      mine__band=[-1.0, 1.0], mine__k=5)
    summary = SynthRun(cfg).run()
    assert [b["image_id"] for b in summary.bad_images] == ["broken.png"]
    assert summary.stages["embeddings"].rows == 6
    triplets = read_table(tmp_path / "out" / "triplets").to_pylist()
    assert triplets and all(t["generator"] == "template:caption-diff" for t in triplets)
    assert all(t["text"].startswith(("replace", "add", "remove", "make it")) for t in triplets)


def test_bad_inputs_fail_at_once_and_leave_nothing(tmp_path, image_folder):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ({"corpus__source": str(empty)}, "holds no files"),
        ({"corpus__source": str(tmp_path / "nope")}, "not found"),
        ({"encode__model": "ViT-Nope-99"}, "unknown encoder model 'ViT-Nope-99'"),
        ({"mine__band": [0.9, 0.2]}, "lo > hi"),
        ({"generate__backend": "telepathy"}, "unknown text-generation backend"),
    ]
    for overrides, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            SynthRun(make_config(out, **overrides))
    (image_folder / "captions.jsonl").unlink()
    with pytest.raises(ValueError, match="captions.jsonl or captions.csv"):
        SynthRun(make_config(out, corpus__source=str(image_folder)))
    table = pa.table({"image_id": ["a"], "image": [b"x"]})
    pq.write_table(table, tmp_path / "nocap.parquet")
    with pytest.raises(ValueError, match="missing column.*caption"):
        SynthRun(make_config(out, corpus__source=str(tmp_path / "nocap.parquet")))
    pq.write_table(table.slice(0, 0).append_column("caption", pa.array([], pa.string())),
                   tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="empty"):
        SynthRun(make_config(out, corpus__source=str(tmp_path / "empty.parquet")))
    assert not out.exists()


def test_parquet_corpus_source(ray_session, shapes_synth, tmp_path):
    out, _ = shapes_synth
    corpus = read_table(out / "corpus").slice(0, 60)
    pq.write_table(corpus, tmp_path / "corpus.parquet")
    cfg = make_config(tmp_path / "out", corpus__source=str(tmp_path / "corpus.parquet"))
    summary = SynthRun(cfg).run()
    assert summary.stages["embeddings"].rows == 60
    assert not (tmp_path / "out" / "corpus").exists()  # a Parquet corpus is read in place
