"""Corpus sources for the synth job: an image folder or a Parquet corpus.

An image folder is every regular, non-hidden file under it (recursively), so that
stray or broken files are found, counted and reported by the encode stage rather
than silently ignored. Captions come from `captions.jsonl` (lines
`{"file": ..., "caption": ..., "category": ...}`) or `captions.csv` (same columns)
beside the images; `file` is the path relative to the folder (or just the file name
when that is unique). The shapes corpus is written by `cir.data.shapes_corpus`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cir import schemas

CAPTION_FILES = ("captions.jsonl", "captions.csv")


def _remote(source):
    """A `cir.storage` Location for a source on a non-local filesystem, else None."""
    from cir.storage import Location, resolve

    if isinstance(source, Location):
        return source
    where = resolve(source) if "://" in str(source) else None
    return where if isinstance(where, Location) else None


def local_source(source) -> Path:
    """A local source as a Path: a plain path as given (~ expanded), a file:// URI as its path."""
    from cir.storage import resolve

    return resolve(source) if "://" in str(source) else Path(source).expanduser()


def corpus_kind(source: str) -> str:
    """'shapes', 'folder' or 'parquet' for a corpus source string (a URI: 'parquet')."""
    if source == "shapes":
        return "shapes"
    remote = _remote(source)
    if remote is not None:
        if not remote.exists():
            raise FileNotFoundError(f"corpus not found: {remote}")
        return "parquet"        # image folders are read from a local path
    path = local_source(source)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {source} (give 'shapes', an image folder or a Parquet corpus)")
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        raise ValueError(f"corpus {source} is a file but not a .parquet file")
    files = [p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)]
    if files and all(p.suffix == ".parquet" or p.name.startswith("_") for p in files):
        return "parquet"
    return "folder"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def read_captions_file(folder: Path) -> dict[str, tuple[str | None, str | None]] | None:
    """{file: (caption, category)} from the folder's captions file, or None if it has none."""
    found = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{folder} has both {found[0].name} and {found[1].name}; keep one")
    path = found[0]
    rows = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object with 'file' and 'caption'")
            rows.append((lineno, row))
    else:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file" not in reader.fieldnames:
                raise ValueError(f"{path}: header must name a 'file' column (has {reader.fieldnames})")
            rows = list(enumerate(reader, 2))
    captions = {}
    for lineno, row in rows:
        if not row.get("file"):
            raise ValueError(f"{path}:{lineno}: missing key 'file'")
        captions[str(row["file"])] = (row.get("caption") or None, row.get("category") or None)
    return captions


def scan_image_folder(folder: str | Path) -> pa.Table:
    """The corpus table (by path) of an image folder, captions joined in."""
    folder = local_source(folder).resolve()
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not _hidden(p, folder) and p.name not in CAPTION_FILES)
    if not files:
        raise ValueError(f"corpus folder {folder} holds no files")
    captions = read_captions_file(folder) or {}
    by_name: dict[str, list[Path]] = {}
    for p in files:
        by_name.setdefault(p.name, []).append(p)
    ids, paths, caps, cats = [], [], [], []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        entry = captions.get(rel)
        if entry is None and len(by_name[p.name]) == 1:
            entry = captions.get(p.name)
        caption, category = entry or (None, None)
        ids.append(rel)
        paths.append(str(p))
        caps.append(caption)
        cats.append(category)
    return pa.table({"image_id": ids, "path": paths, "caption": caps, "category": cats},
                    schema=schemas.CORPUS_BY_PATH)


def parquet_corpus_files(source) -> list:
    """The Parquet files of a corpus: path strings, or `cir.storage` locations for one at
    a URI (those its `_SUCCESS.json` lists, when it is a stage another job wrote)."""
    remote = _remote(source)
    if remote is not None:
        from cir.outputs import parquet_files
        from cir.storage import refs

        files = [remote] if remote.is_file() else parquet_files(remote)
        if not files:
            raise ValueError(f"corpus {remote} holds no Parquet files (a corpus at a URI must be a Parquet "
                             "table; image folders are read from a local path)")
        return refs(files)
    path = local_source(source).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.parquet") if not _hidden(p, path))
    if not files:
        raise ValueError(f"corpus {source} holds no Parquet files")
    return [str(f) for f in files]


def check_parquet_corpus(files: list, needs_captions: bool) -> pa.Schema:
    """Schema of a Parquet corpus after checking its columns and that it has rows.
    `files`: paths, or `cir.storage` locations (a corpus the synth job wrote to a URI)."""
    from cir.outputs import parquet_file

    schema = parquet_file(files[0]).schema_arrow
    what = f"Parquet corpus {files[0]}"
    schemas.require_columns(schema, ["image_id"], what)
    if "image" not in schema.names and "path" not in schema.names:
        raise ValueError(f"{what} needs an 'image' (bytes) or a 'path' column; it has {', '.join(schema.names)}")
    if needs_captions:
        schemas.require_columns(schema, ["caption"], f"{what} (the text backend needs captions)")
    if sum(parquet_file(f).metadata.num_rows for f in files) == 0:
        raise ValueError(f"corpus {files[0]} is empty (0 rows)")
    return schema


def read_captions(files: list) -> pa.Table:
    """image_id, caption, category of a corpus (absent columns come back null); `files`
    as `check_parquet_corpus`'s."""
    from cir.storage import split

    tables = []
    for f in files:
        fs, where = split(f)
        names = pq.read_schema(where, filesystem=fs).names
        t = pq.read_table(where, columns=[c for c in ("image_id", "caption", "category") if c in names],
                          filesystem=fs)
        for col in ("caption", "category"):
            if col not in t.column_names:
                t = t.append_column(col, pa.nulls(t.num_rows, pa.string()))
        tables.append(t.select(["image_id", "caption", "category"]))
    return pa.concat_tables(tables)
