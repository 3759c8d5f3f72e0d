"""A job's output folder: one subfolder per table, each committed atomically.

A stage writes into a hidden temporary sibling (`.NAME.tmp-XXXX`), then writes
`_SUCCESS.json` (rows, seconds, the config it was made with) and renames the folder
into place. A folder without `_SUCCESS.json` is therefore never mistaken for a
finished table, a crash leaves at most a hidden temp folder (removed on the next
run), and a rerun skips the stages whose output is complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS.json"


class StageConfigMismatch(RuntimeError):
    pass


class OutputDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> bool:
        return (self.path(stage) / SUCCESS).is_file()

    def manifest(self, stage: str) -> dict:
        return json.loads((self.path(stage) / SUCCESS).read_text())

    def check_fingerprint(self, stage: str, fingerprint: dict) -> None:
        """A finished stage made with other settings must not be silently reused."""
        recorded = self.manifest(stage).get("config")
        if recorded != fingerprint:
            raise StageConfigMismatch(
                f"{self.path(stage)} was made with other settings ({recorded}) than this "
                f"run's ({fingerprint}); use another --output, or delete that folder to redo it"
            )

    def clean_stale(self) -> None:
        """Remove temp folders of crashed runs and unfinished stage folders."""
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.name.startswith(".") and ".tmp-" in child.name:
                shutil.rmtree(child, ignore_errors=True)

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
        with atomic_path(self.path(stage), directory=True) as tmp:
            yield tmp, manifest
            write_json_atomic(tmp / SUCCESS, manifest)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False):
    """Yield a temporary sibling of `path` to write (an empty folder when `directory`);
    on success it replaces `path`, on failure it is removed. Readers therefore see the
    old version or the complete new one, never half of it. An existing folder is moved
    aside, the new one renamed in, and the old one deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
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


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data, *, indent: int | None = 2, sort_keys: bool = True) -> Path:
    """JSON to `path` through `atomic_path` (submission files pass indent=None and keep
    their key order)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=str)
    return write_text_atomic(path, text + "\n" if indent is not None else text)


def write_table(table: pa.Table, folder: Path, rows_per_file: int = 50_000) -> None:
    """Write `table` as numbered Parquet shards into an (empty, temporary) folder."""
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-table.num_rows // rows_per_file))
    for i in range(n_files):
        part = table.slice(i * rows_per_file, rows_per_file)
        pq.write_table(part, folder / f"part-{i:05d}.parquet")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def parquet_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*.parquet") if not p.name.startswith("."))


def read_table(folder: Path, columns=None) -> pa.Table:
    """Read a table folder (or one file); the schema metadata of the first shard is kept."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else parquet_files(folder)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {folder}")
    tables = [pq.read_table(f, columns=columns) for f in files]
    schema = tables[0].schema
    return pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in tables])
