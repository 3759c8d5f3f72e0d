"""A job's output folder: one subfolder per table, each committed atomically.

A folder may be local or on any pyarrow filesystem (`cir.storage`: `s3://`, `gs://`, ...).
A stage commits its table in one step that readers never see half done:

* local: it is written into a hidden temporary sibling (`.NAME.tmp-XXXX`) with its
  `_SUCCESS.json` (rows, seconds, the config it was made with, its files), and the
  folder is renamed into place;
* elsewhere (object stores have no rename): it is written under a unique prefix
  inside the folder (`NAME/attempt-XXXX/`), and `_SUCCESS.json`, listing those files,
  is written last, in one upload; a new version overwrites the marker, then the
  older attempts are deleted.

Either way a folder without `_SUCCESS.json` is never mistaken for a finished table,
readers read only the files its marker lists (never a half-written attempt beside
them), a crash leaves at most a temp folder or an unlisted attempt (removed by the
next run's `clean_stale`), and a rerun skips the stages whose output is complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cir.storage import (Location, Where, check_access, copy_file, read_json, remove_tree, resolve, split, upload,
                         walk_files)

SUCCESS = "_SUCCESS.json"
ATTEMPT = "attempt-"      # prefix of a stage's data on an object store


class StageConfigMismatch(RuntimeError):
    pass


class OutputDir:
    """`root`: a local path, a URI, or a path on `filesystem` (any pyarrow FileSystem)."""

    def __init__(self, root, filesystem=None):
        self.root: Where = resolve(root, filesystem)
        check_access(self.root)       # refused credentials fail here, before any work

    def path(self, stage: str) -> Where:
        return self.root / stage

    def done(self, stage: str) -> bool:
        return (self.path(stage) / SUCCESS).is_file()

    def manifest(self, stage: str) -> dict:
        return read_json(self.path(stage) / SUCCESS)

    def check_fingerprint(self, stage: str, fingerprint: dict) -> None:
        """A finished stage made with other settings must not be silently reused."""
        recorded = self.manifest(stage).get("config")
        if recorded != fingerprint:
            raise StageConfigMismatch(
                f"{self.path(stage)} was made with other settings ({recorded}) than this "
                f"run's ({fingerprint}); use another --output, or delete that folder to redo it"
            )

    def clean_stale(self) -> None:
        """Remove temp folders of crashed runs, and attempts on an object store that no
        marker lists (a crashed run's, or a version a newer commit replaced)."""
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.name.startswith(".") and ".tmp-" in child.name:
                remove_tree(child)
            elif isinstance(child, Location) and child.is_dir():
                _remove_unlisted_attempts(child)

    def run_stage(self, stage: str, fingerprint: dict, work) -> tuple[dict, bool]:
        """Make `stage` with `work(tmp) -> dict of manifest entries`, unless it is done with
        this fingerprint (then it is kept; another fingerprint raises). Returns its
        manifest and whether it was skipped."""
        from cir.progress import log

        if self.done(stage):
            self.check_fingerprint(stage, fingerprint)
            log(f"{stage}: already done in {self.path(stage)}, skipping")
            return self.manifest(stage), True
        log(f"{stage}: starting")
        t0 = time.perf_counter()
        with self.stage(stage, fingerprint) as (tmp, manifest):
            manifest.update(work(tmp) or {})
            manifest["seconds"] = round(time.perf_counter() - t0, 3)
        log(f"{stage}: done in {manifest['seconds']:.1f}s -> {self.path(stage)}")
        return self.manifest(stage), False

    @contextlib.contextmanager
    def stage(self, stage: str, fingerprint: dict):
        """Yield a temp folder and a manifest dict to fill; commit both on success."""
        manifest = {"stage": stage, "config": fingerprint}
        with atomic_path(self.path(stage), directory=True, marker=manifest) as tmp:
            yield tmp, manifest


@contextlib.contextmanager
def atomic_path(path, *, directory: bool = False, marker: dict | None = None):
    """Yield a place to write `path` (an empty folder when `directory`); on success it
    becomes `path`, on failure it is removed. Readers see the old version or the
    complete new one, never half of it.

    Local: a temporary sibling (a Path), renamed into place; an existing folder is moved
    aside, the new one renamed in, and the old one deleted. `marker` (a dict, read at
    commit time) is written into the folder as `_SUCCESS.json` with the list of its files.

    On an object store: a folder is a `Location` under a unique attempt prefix, committed
    by writing `_SUCCESS.json` (`marker` and the files) last; a file is written to a
    local temporary file (any library can write it) and uploaded in one stream, which
    S3 and GCS make visible whole or not at all."""
    where = resolve(path)
    if isinstance(where, Location):
        commit = _commit_remote_folder(where, marker) if directory else _upload_file(where)
        with commit as tmp:
            yield tmp
        return
    path = where
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and marker is not None:
            _write_marker(tmp, tmp, marker)
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _write_marker(folder: Where, data: Where, marker: dict) -> None:
    """`folder/_SUCCESS.json`: `marker` plus the files under `data`, relative to `folder`."""
    if isinstance(folder, Location):
        files = [f.relative_to(folder) for f in walk_files(data)]
    else:
        files = [f.relative_to(folder).as_posix() for f in walk_files(data)]
    # Sorted as pathlib sorts (by parts), so that readers take the shards in the order they always did.
    entries = {**marker, "files": sorted((f for f in files if f != SUCCESS), key=lambda f: f.split("/"))}
    (folder / SUCCESS).write_text(json.dumps(entries, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def _commit_remote_folder(folder: Location, marker: dict | None):
    attempt = folder / f"{ATTEMPT}{uuid.uuid4().hex[:8]}"
    attempt.mkdir()
    try:
        yield attempt
        _write_marker(folder, attempt, marker or {})   # the commit: one object, written last
    except BaseException:
        attempt.rmtree()
        raise
    _remove_unlisted_attempts(folder)                  # the versions this one replaced


def _remove_unlisted_attempts(folder: Location) -> None:
    """Delete the attempts a folder's marker does not list (all of them without a marker):
    crashed runs' and replaced versions. Like the local temp folders, an attempt that
    another run is writing into the same output now would go too: one run per output."""
    listed = set()
    if (folder / SUCCESS).is_file():
        listed = {f.split("/", 1)[0] for f in read_json(folder / SUCCESS).get("files", [])}
    for child in folder.iterdir():
        if child.name.startswith(ATTEMPT) and child.name not in listed:
            child.rmtree()


@contextlib.contextmanager
def _upload_file(target: Location):
    staging = Path(tempfile.mkdtemp(prefix="cir-upload-"))
    try:
        tmp = staging / target.name
        yield tmp
        upload(tmp, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_output(src, dst, stages: list[str]) -> None:
    """Copy finished stages from one output to another, across filesystems: e.g. an index
    job's `index` and `gallery` from a bucket down to the local folder a server reads.
    Each stage arrives committed as a run there would have written it: its files
    (without an object store's attempt prefix) and its marker."""
    src_out, dst_out = OutputDir(src), OutputDir(dst)
    for stage in stages:
        if not src_out.done(stage):
            raise FileNotFoundError(f"{src_out.path(stage)} is not a finished stage (no {SUCCESS})")
        manifest = src_out.manifest(stage)
        files = manifest.pop("files", None)
        folder = src_out.path(stage)
        if files is None:         # a marker from before the file lists: its folder's files
            files = [f.relative_to(folder) if isinstance(f, Location) else f.relative_to(folder).as_posix()
                     for f in walk_files(folder)]
        with atomic_path(dst_out.path(stage), directory=True, marker=manifest) as tmp:
            for name in (f for f in files if f != SUCCESS):
                first, _, rest = name.partition("/")
                copy_file(folder / name, tmp / (rest if first.startswith(ATTEMPT) and rest else name))


def local_output(src, stages: list[str]) -> Path:
    """A local folder holding the finished `stages` of the output `src`: `src` itself when
    it is local; for a URI, a copy in this node's cache (`cir.storage.cache_dir`), made by
    `copy_output` once per version of those stages (their markers), so that the serving
    replicas of a node share one download. For readers that need a local disk (FAISS
    maps its shard files)."""
    from cir.storage import cache_dir, install_dir

    out = OutputDir(src)
    if isinstance(out.root, Path):
        return out.root
    for stage in stages:
        if not out.done(stage):
            raise FileNotFoundError(f"{out.path(stage)} is not a finished stage (no {SUCCESS})")
    markers = "\n".join((out.path(s) / SUCCESS).read_text() for s in stages)
    digest = hashlib.sha1(f"{out.root}\n{markers}".encode()).hexdigest()[:16]
    return install_dir(cache_dir() / "outputs" / f"{out.root.name}-{digest}",
                       lambda tmp: copy_output(out.root, tmp, stages))


def write_text_atomic(path, text: str) -> Where:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return resolve(path)


def write_json_atomic(path, data, *, indent: int | None = 2, sort_keys: bool = True) -> Where:
    """JSON to `path` through `atomic_path` (submission files pass indent=None and keep
    their key order)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=str)
    return write_text_atomic(path, text + "\n" if indent is not None else text)


def write_table(table: pa.Table, folder, rows_per_file: int = 50_000) -> None:
    """Write `table` as numbered Parquet shards into an (empty, temporary) folder."""
    folder = resolve(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-table.num_rows // rows_per_file))
    for i in range(n_files):
        part = table.slice(i * rows_per_file, rows_per_file)
        fs, where = split(folder / f"part-{i:05d}.parquet")
        pq.write_table(part, where, filesystem=fs)


def file_sha256(path) -> str:
    """Hex sha256 of a file (a local path or a `cir.storage` URI / location), read in
    4 MiB chunks."""
    where = resolve(path)
    h = hashlib.sha256()
    with (where.fs.open_input_stream(where.path) if isinstance(where, Location) else open(where, "rb")) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def parquet_files(folder) -> list[Where]:
    """The Parquet files of a table folder: those its `_SUCCESS.json` lists when it lists
    them (so a half-written attempt beside them is never read), else every non-hidden
    `.parquet` file below it (a folder from elsewhere, or one being written)."""
    folder = resolve(folder)
    marker = folder / SUCCESS
    if marker.is_file():
        listed = read_json(marker).get("files")
        if listed is not None:
            return [f for f in (folder / name for name in listed) if _is_parquet(f)]
    return [f for f in walk_files(folder) if _is_parquet(f)]


def _is_parquet(f: Where) -> bool:
    return f.name.endswith(".parquet") and not f.name.startswith(".")


def parquet_file(path) -> pq.ParquetFile:
    """A ParquetFile for a local path or a Location."""
    fs, where = split(path)
    return pq.ParquetFile(where, filesystem=fs)


def count_rows(folder) -> int:
    return sum(parquet_file(f).metadata.num_rows for f in parquet_files(folder))


def read_table(folder, columns=None) -> pa.Table:
    """Read a table folder (or one file); the schema metadata of the first shard is kept."""
    folder = resolve(folder)
    files = [folder] if folder.is_file() else parquet_files(folder)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {folder}")
    tables = []
    for f in files:
        fs, where = split(f)
        tables.append(pq.read_table(where, columns=columns, filesystem=fs))
    schema = tables[0].schema
    return pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in tables])
