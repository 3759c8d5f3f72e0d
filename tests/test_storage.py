"""cir.storage and cir.outputs on filesystems other than the local disk (no Ray).

The object-store commit is exercised on an in-memory fsspec filesystem (what the code
sees of it is only pyarrow's FileSystem API: any os/pathlib fallback would miss it) and
on a SubTreeFileSystem over a temp folder, whose paths mean nothing to os."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from cir.outputs import (SUCCESS, OutputDir, StageConfigMismatch, atomic_path, parquet_files, read_table,
                         write_json_atomic, write_table)
from cir.storage import Location, StorageError, local_copy, resolve


def _memory_fs() -> pafs.FileSystem:
    fsspec = pytest.importorskip("fsspec")
    # A fresh root per test: fsspec's memory store is one per process.
    return pafs.SubTreeFileSystem(f"/{uuid.uuid4().hex}",
                                  pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory"))))


@pytest.fixture(params=["memory", "subtree"])
def remote_root(request, tmp_path, monkeypatch) -> Location:
    monkeypatch.chdir(tmp_path)      # a fallback to os would write here: checked below
    fs = _memory_fs() if request.param == "memory" else pafs.SubTreeFileSystem(str(tmp_path / "bucket"),
                                                                               pafs.LocalFileSystem())
    yield resolve("runs/a", filesystem=fs)
    assert not (tmp_path / "runs").exists(), "something wrote to the local disk"


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"pair_id": [f"p{i}" for i in range(start, start + n)],
                     "similarity": pa.array([i / 10 for i in range(n)], pa.float32())})


def test_resolve_local_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("out") == tmp_path / "out"
    assert resolve(f"file://{tmp_path}/x") == tmp_path / "x"          # a local disk: a Path, renamed as ever
    assert resolve("y", filesystem=pafs.LocalFileSystem()) == tmp_path / "y"
    s3 = resolve("s3://bucket/runs/a?region=eu-west-1")
    assert isinstance(s3, Location) and isinstance(s3.fs, pafs.S3FileSystem) and s3.path == "bucket/runs/a"
    assert str(s3 / "corpus") == "s3://bucket/runs/a/corpus?region=eu-west-1"     # resolves again
    assert (s3 / "corpus" / "x.parquet").parent.name == "corpus"
    assert isinstance(resolve("gs://bucket/runs").fs, pafs.GcsFileSystem)


def test_unknown_scheme_is_refused_by_name():
    with pytest.raises(StorageError, match=r"no filesystem for foo://.*s3://"):
        resolve("foo://bucket/x")


def test_a_location_is_never_taken_for_a_local_path(remote_root):
    with pytest.raises(TypeError, match="not a local path"):
        open(remote_root / "x.json", "w")
    with pytest.raises(TypeError, match="not a local path"):
        Path(remote_root)


def test_stage_commit_on_an_object_store(remote_root):
    out = OutputDir(remote_root)
    with pytest.raises(RuntimeError):
        with out.stage("pairs", {"k": 1}) as (tmp, manifest):
            write_table(_table(5), tmp, rows_per_file=2)
            raise RuntimeError("crash mid-stage")
    assert not out.done("pairs") and out.path("pairs").iterdir() == []   # the attempt is gone

    with out.stage("pairs", {"k": 1}) as (tmp, manifest):
        assert tmp.parent == out.path("pairs") and tmp.name.startswith("attempt-")
        write_table(_table(5), tmp, rows_per_file=2)
        assert not out.done("pairs")           # no marker until the stage is complete
        manifest["rows"] = 5
    assert out.done("pairs") and out.manifest("pairs")["rows"] == 5
    assert out.manifest("pairs")["files"] == [f"{tmp.name}/part-0000{i}.parquet" for i in range(3)]
    assert read_table(out.path("pairs")).equals(_table(5))
    out.check_fingerprint("pairs", {"k": 1})
    with pytest.raises(StageConfigMismatch, match="other settings"):
        out.check_fingerprint("pairs", {"k": 2})
    # Resume: a finished stage is skipped, its work never called.
    manifest, skipped = out.run_stage("pairs", {"k": 1}, lambda tmp: 1 / 0)
    assert skipped and manifest["rows"] == 5


def test_readers_see_only_the_files_the_marker_lists(remote_root):
    out = OutputDir(remote_root)
    with out.stage("pairs", {}) as (tmp, _):
        write_table(_table(4), tmp)
    # A crashed writer's attempt beside the committed one: never read, cleaned on the next run.
    stale = out.path("pairs") / "attempt-deadbeef"
    write_table(_table(3, start=100), stale)
    assert read_table(out.path("pairs")).equals(_table(4))
    out.clean_stale()
    assert not stale.exists() and read_table(out.path("pairs")).equals(_table(4))


def test_a_new_version_replaces_the_old_whole(remote_root):
    folder = remote_root / "rejected"
    with atomic_path(folder, directory=True) as tmp:
        write_table(_table(4), tmp)
    first = json.loads((folder / SUCCESS).read_text())["files"]
    with atomic_path(folder, directory=True) as tmp:
        write_table(_table(2, start=50), tmp)
    assert read_table(folder).equals(_table(2, start=50))
    assert [f.name for f in folder.iterdir() if f.name.startswith("attempt-")] == [tmp.name]
    assert not (folder / first[0]).exists()


def test_atomic_file_on_an_object_store(remote_root):
    target = remote_root / "runs" / "history.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not target.exists()
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_refused_access_names_the_location():
    fsspec = pytest.importorskip("fsspec")

    class Refusing(pafs.FSSpecHandler):      # what S3 answers a caller without credentials
        def get_type_name(self):
            return "refusing"

        def get_file_info(self, paths):
            raise PermissionError("AWS Error ACCESS_DENIED during HeadObject operation")

    refusing = pafs.PyFileSystem(Refusing(fsspec.filesystem("memory")))
    with pytest.raises(StorageError, match=r"cannot reach py::refusing:bucket/run: AWS Error ACCESS_DENIED.*"
                                           r"credentials"):
        OutputDir("bucket/run", filesystem=refusing)


def test_local_folders_keep_the_rename_and_list_their_files(tmp_path):
    out = OutputDir(f"file://{tmp_path}/out")
    assert isinstance(out.root, Path)
    with out.stage("pairs", {}) as (tmp, _):
        assert isinstance(tmp, Path) and tmp.name.startswith(".pairs.tmp-")
        write_table(_table(3), tmp / "sub")
    assert sorted(os.listdir(out.root)) == ["pairs"]
    assert out.manifest("pairs")["files"] == ["sub/part-00000.parquet"]
    assert parquet_files(out.path("pairs")) == [out.path("pairs") / "sub" / "part-00000.parquet"]
    # A folder whose marker predates the file list is read by listing, as before.
    (out.path("pairs") / SUCCESS).write_text(json.dumps({"stage": "pairs", "config": {}}))
    assert read_table(out.path("pairs")).equals(_table(3))


def test_copy_output_between_filesystems(remote_root, tmp_path):
    from cir.outputs import copy_output

    out = OutputDir(remote_root)
    with out.stage("gallery", {"k": 1}) as (tmp, manifest):
        write_table(_table(5), tmp / "sub", rows_per_file=2)
        manifest["rows"] = 5
    copy_output(remote_root, tmp_path / "down", ["gallery"])       # down: a local folder a server reads
    local = OutputDir(tmp_path / "down")
    assert local.manifest("gallery") == {**out.manifest("gallery"),
                                         "files": [f"sub/part-0000{i}.parquet" for i in range(3)]}
    assert read_table(local.path("gallery")).equals(_table(5))
    copy_output(tmp_path / "down", remote_root / "up", ["gallery"])   # and up again
    assert read_table(remote_root / "up" / "gallery").equals(_table(5))
    with pytest.raises(FileNotFoundError, match="not a finished stage"):
        copy_output(remote_root, tmp_path / "down", ["index"])


def test_job_settings_take_uris_and_refuse_unknown_schemes_by_name(tmp_path):
    """Run storage, generator data and eval output may be URIs; a scheme pyarrow has no
    filesystem for is refused before any work, naming the setting."""
    from cir.evaluation.config import EvalConfig
    from cir.train.config import DeepSpeedConfig, RunSettings, TrainConfig, validate_run
    from cir.train.generator_config import GeneratorDataConfig
    from cir.train.run import run_folder

    uri = "s3://bucket/runs?region=us-east-1"
    validate_run(RunSettings(storage=uri), DeepSpeedConfig())
    GeneratorDataConfig(synth_dir=uri).validate("stages[m]", "modification")
    EvalConfig(benchmark="shapes", model="baseline:image-only", encoder="cir-tiny", output="gs://bucket/eval").validate()
    with pytest.raises(StorageError, match=r"no filesystem for foo://"):
        validate_run(RunSettings(storage="foo://bucket/runs"), DeepSpeedConfig())
    with pytest.raises(StorageError, match=r"stages\[m\].data.synth_dir: .*foo://"):
        GeneratorDataConfig(synth_dir="foo://x").validate("stages[m]", "modification")
    cfg = TrainConfig()
    cfg.run.storage = uri
    assert str(run_folder(cfg)) == f"s3://bucket/runs/{cfg.run.name}?region=us-east-1"
    cfg.run.storage = f"file://{tmp_path}/runs"          # a local disk: a Path
    assert run_folder(cfg) == tmp_path / "runs" / cfg.run.name


def test_a_parquet_corpus_at_an_s3_uri(s3_uri):
    """The synth job's and the index job's corpus readers on S3 (CIR_TEST_S3_URI)."""
    from conftest import uri_child
    from cir.data import corpus as corpus_io

    uri = s3_uri
    table = pa.table({"image_id": ["a", "b", "c"], "image": [b"1", b"2", b"3"],
                      "caption": ["x", None, "z"]})
    write_table(table, resolve(uri_child(uri, "corpus")), rows_per_file=2)
    source = uri_child(uri, "corpus")
    assert corpus_io.corpus_kind(source) == "parquet"
    files = corpus_io.parquet_corpus_files(source)
    assert len(files) == 2 and all(isinstance(f, Location) for f in files)
    corpus_io.check_parquet_corpus(files, needs_captions=True)
    assert corpus_io.read_captions(files).column("caption").to_pylist() == ["x", None, "z"]
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        corpus_io.corpus_kind(uri_child(uri, "nothing"))


def test_local_copy_is_made_once_per_version(tmp_path, monkeypatch):
    """A location's files copied into the cache once; changed files get a new copy; a
    local path is itself; an empty location is refused by name."""
    monkeypatch.setenv("CIR_CACHE_DIR", str(tmp_path / "cache"))
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    export = resolve("runs/a/export", filesystem=fs)
    (export / "lm").mkdir()
    (export / "lm" / "tokenizer.json").write_text("{}")
    (export / "config.json").write_text('{"v": 1}')
    first = local_copy(export)
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()) == \
        ["config.json", "lm/tokenizer.json"]
    assert local_copy(export) == first
    (export / "config.json").write_text('{"v": 22}')
    second = local_copy(export)
    assert second != first and (second / "config.json").read_text() == '{"v": 22}'
    assert local_copy(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="runs/b: no files"):
        local_copy(resolve("runs/b", filesystem=fs), "export")
    assert not [p for p in (tmp_path / "cache" / "remote").iterdir() if p.name.startswith(".")]
