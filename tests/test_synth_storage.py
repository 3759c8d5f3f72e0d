"""The synth job writing to storage that is not a local folder: the same tables as a
local run, resumed and refused the same way.

* a SubTreeFileSystem over a temp folder: its paths ("runs/shapes/...") mean nothing to
  os or pathlib, so any reader or writer (in this process or a Ray Data task) that
  fell back to the local disk would miss the tables or write beside them;
  The quality filter's branch (a scratch folder, `rejected/`) runs there too, and the
  composer's training sources read the output back;
* a file:// URI through the job's command line;
* an S3 endpoint (the `s3_uri` fixture: CIR_TEST_S3_URI, by default a local moto
  server that conftest starts): the job's output, and a Parquet corpus read from there.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.fs as pafs
import pytest

from cir.outputs import SUCCESS, copy_output, read_table
from cir.storage import Location, resolve
from cir.synth.pipeline import SynthRun
from conftest import MINED_STAGES, copy_mined, load_job, uri_child
from conftest import shapes_synth_config as make_config

STAGES = ("corpus", "embeddings", "pairs", "triplets")
KEYS = {"corpus": "image_id", "embeddings": "image_id", "pairs": "pair_id", "triplets": "triplet_id"}


def assert_same_tables(local, remote) -> None:
    """The tables of two synth outputs are the same (embeddings to float rounding: Ray
    Data may batch the images differently)."""
    for stage in STAGES:
        a, b = (read_table(root / stage).sort_by(KEYS[stage]) for root in (local, remote))
        assert a.schema.equals(b.schema, check_metadata=True), stage
        if stage == "embeddings":
            assert a.column("image_id").equals(b.column("image_id"))
            np.testing.assert_allclose(np.stack(a.column("embedding").to_numpy(zero_copy_only=False)),
                                       np.stack(b.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-5)
        elif stage == "pairs":
            assert a.drop_columns(["similarity"]).equals(b.drop_columns(["similarity"]))
        else:
            assert a.equals(b), stage


def test_synth_on_a_filesystem_that_is_not_the_local_disk(shapes_synth, tmp_path, monkeypatch):
    local, _ = shapes_synth
    monkeypatch.chdir(tmp_path)
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    root = resolve("runs/shapes", filesystem=fs)
    assert isinstance(root, Location)

    summary = SynthRun(make_config("runs/shapes"), filesystem=fs).run()
    assert not (tmp_path / "runs").exists(), "a stage wrote to the local disk"
    assert all(not r.skipped for r in summary.stages.values())
    assert_same_tables(local, root)
    for stage in STAGES:
        listed = root / stage / SUCCESS
        files = json.loads(listed.read_text())["files"]
        assert files and all(f.startswith("attempt-") for f in files), stage
    assert summary.stages["triplets"].path == str(root / "triplets")

    # The composer's training sources read a synth output wherever it was written.
    from cir.train.sources import slerp_triplets, synth_triplets

    for make in (synth_triplets, slerp_triplets):
        assert make(root, "cir-shapes").equals(make(local, "cir-shapes")), make.__name__

    # Resume: nothing to redo.
    again = SynthRun(make_config("runs/shapes"), filesystem=fs).run()
    assert all(r.skipped for r in again.stages.values())

    # A crash while the last stage was being redone: its attempt is there, its marker
    # is not. The rerun redoes that stage alone, and the crashed attempt goes.
    before = read_table(root / "triplets").sort_by("triplet_id")
    (root / "triplets" / SUCCESS).unlink()
    crashed = [c for c in (root / "triplets").iterdir() if c.name.startswith("attempt-")]
    assert len(crashed) == 1
    resumed = SynthRun(make_config("runs/shapes"), filesystem=fs).run()
    assert [n for n, r in resumed.stages.items() if not r.skipped] == ["triplets"]
    assert not crashed[0].exists()
    assert read_table(root / "triplets").sort_by("triplet_id").equals(before)

    with pytest.raises(RuntimeError, match="other settings"):
        SynthRun(make_config("runs/shapes", mine__k=3), filesystem=fs).run()


def test_quality_filter_on_a_filesystem_that_is_not_the_local_disk(shapes_synth, tmp_path, monkeypatch):
    """The filter's branch: its scratch folder inside the stage's attempt, the kept rows,
    and `rejected/` committed on its own; the same rows and counts as on a local folder."""
    local, _ = shapes_synth
    monkeypatch.chdir(tmp_path)
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    root = resolve("runs/filtered", filesystem=fs)
    copy_output(local, root, list(MINED_STAGES))          # the mined stages, uploaded
    settings = {"filter__enabled": True, "filter__max_words": 12}
    here = SynthRun(make_config(copy_mined(local, tmp_path / "local"), **settings)).run()
    there = SynthRun(make_config("runs/filtered", **settings), filesystem=fs).run()
    assert not (tmp_path / "runs").exists(), "a stage wrote to the local disk"
    for summary in (here, there):
        assert [n for n, r in summary.stages.items() if not r.skipped] == ["triplets"]
    counts = there.stages["triplets"].extra["filter"]
    assert counts == here.stages["triplets"].extra["filter"] and counts["dropped"].get("too_long", 0) > 0
    for table in ("triplets", "rejected"):
        a, b = (read_table(r / table).sort_by("triplet_id") for r in (tmp_path / "local", root))
        assert a.equals(b), table
    assert (root / "rejected" / SUCCESS).is_file() and there.rejected == str(root / "rejected")
    assert not any("_candidates" in f for f in json.loads((root / "triplets" / SUCCESS).read_text())["files"])


def test_synth_job_takes_a_file_uri(shapes_synth, tmp_path, capsys):
    local, _ = shapes_synth
    copy = tmp_path / "out"
    shutil.copytree(local, copy)
    code = load_job("synth").main(["--output", f"file://{copy}", "--set", "corpus.shapes.n_images=200"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"outputs in {copy}" in out and out.count("reused") == len(STAGES)


def test_synth_job_refuses_an_unknown_scheme(capsys):
    code = load_job("synth").main(["--output", "nosuch://bucket/run"])
    assert code == 2 and "no filesystem for nosuch://" in capsys.readouterr().err


def test_synth_job_on_s3(s3_uri, shapes_synth, capsys):
    local, _ = shapes_synth
    uri = s3_uri
    job = load_job("synth")
    assert job.main(["--output", uri, "--set", "corpus.shapes.n_images=200"]) == 0
    assert_same_tables(local, resolve(uri))
    assert job.main(["--output", uri, "--set", "corpus.shapes.n_images=200"]) == 0
    out = capsys.readouterr().out
    assert out.count("reused") == len(STAGES)
    userinfo = uri.partition("://")[2].partition("/")[0]
    assert "@" not in userinfo or userinfo not in out, "credentials in the job's output"


def test_synth_reads_its_corpus_from_s3(s3_uri, shapes_synth, tmp_path):
    """A Parquet corpus at a URI (here a synth output's corpus/ stage, read through its
    marker) into a local output: the same pairs and triplets as from the local corpus."""
    local, _ = shapes_synth
    uri = s3_uri
    copy_output(local, resolve(uri), ["corpus"])
    summary = SynthRun(make_config(tmp_path / "out", corpus__source=uri_child(uri, "corpus"))).run()
    assert summary.stages["corpus"].path == str(resolve(uri_child(uri, "corpus")))
    for stage in ("pairs", "triplets"):
        a, b = (read_table(root / stage).sort_by(KEYS[stage]) for root in (local, tmp_path / "out"))
        assert a.drop_columns(["similarity"]).equals(b.drop_columns(["similarity"])), stage
