"""A job's output folder: one subfolder per table, each committed atomically.

A stage writes into a hidden temporary sibling (`.NAME.tmp-XXXX`), then writes
`_SUCCESS.json` (rows, seconds, the config it was made with) and renames the folder
into place. A folder without `_SUCCESS.json` is therefore never mistaken for a
finished table, a crash leaves at most a hidden temp folder (removed on the next
run), and a rerun skips the stages whose output is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
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

    @contextlib.contextmanager
    def stage(self, stage: str, fingerprint: dict):
        """Yield a temp folder and a manifest dict to fill; commit both on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        manifest = {"stage": stage, "config": fingerprint}
        try:
            yield tmp, manifest
            write_json_atomic(tmp / SUCCESS, manifest)
            final = self.path(stage)
            if final.exists():  # an unfinished or deliberately redone stage
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_table(table: pa.Table, folder: Path, rows_per_file: int = 50_000) -> None:
    """Write `table` as numbered Parquet shards into an (empty, temporary) folder."""
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-table.num_rows // rows_per_file))
    for i in range(n_files):
        part = table.slice(i * rows_per_file, rows_per_file)
        pq.write_table(part, folder / f"part-{i:05d}.parquet")


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
