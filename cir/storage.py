"""Where a job reads and writes: a local folder, or a URI on any pyarrow filesystem.

    resolve("outputs/run")         -> Path("/abs/outputs/run")       os and pathlib, as always
    resolve("file:///mnt/x")       -> Path("/mnt/x")                 the same: a local disk
    resolve("s3://bucket/run")     -> Location(S3FileSystem, "bucket/run")
    resolve("gs://bucket/run")     -> Location(GcsFileSystem, "bucket/run")
    resolve("run", filesystem=fs)  -> Location(fs, "run")            any pyarrow FileSystem

A `Location` has the part of pathlib's API that the jobs use (`/`, `name`, `parent`,
`exists`, `is_file`, `is_dir`, `mkdir`, `read_text`, `write_text`, ...) done through its
filesystem, so code that needs only those works on both. It has no usable
`__fspath__`: handing one to `open`, `os` or `Path` raises a TypeError that names the
location, so a code path that still assumes a local disk fails loudly instead of
writing a folder called `s3:` in the working directory of whichever node ran it.

Pyarrow and Ray Data take the filesystem explicitly (`split`, `split_many`), so a
filesystem given as an object (not a URI) reaches every reader and writer.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union
from urllib.parse import urlsplit

import pyarrow.fs as pafs

# Schemes pyarrow 26's FileSystem.from_uri knows (hdfs and viewfs need a JVM and libhdfs
# on every node; abfs is Azure).
KNOWN_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")

CREDENTIALS_HINT = ("check the credentials on every node (S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE or an instance role; GCS: GOOGLE_APPLICATION_CREDENTIALS or the VM's "
                    "service account) and that the bucket exists")


class StorageError(ValueError):
    """A storage location that cannot be used: an unknown scheme, refused credentials, a
    URI where only a local path works yet. A ValueError: to a job, a bad setting."""


@dataclass(frozen=True)
class Location:
    """A path on a non-local pyarrow filesystem (picklable: Ray tasks can take one)."""

    fs: pafs.FileSystem = field(compare=False)
    path: str            # the filesystem's own path: "bucket/key" on S3, no scheme, no trailing "/"
    prefix: str = ""     # "s3://" when made from a URI: str() gives back a URI
    query: str = ""      # the URI's options (region, endpoint_override), kept so str() resolves again

    def __str__(self) -> str:
        if not self.prefix:
            return f"{self.fs.type_name}:{self.path}"
        return f"{self.prefix}{self.path}" + (f"?{self.query}" if self.query else "")

    def __fspath__(self):
        raise TypeError(f"{self} is on {self.fs.type_name} storage, not a local path: this code path "
                        "supports local folders only")

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and self.path == other.path and self.fs.equals(other.fs)

    def __hash__(self) -> int:
        return hash((self.fs.type_name, self.path))

    def __truediv__(self, name) -> Location:
        name = str(name)
        if name.startswith("/") or "://" in name:
            raise ValueError(f"{name!r} is not a relative path under {self}")
        return Location(self.fs, posixpath.normpath(posixpath.join(self.path, name)), self.prefix, self.query)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path), self.prefix, self.query)

    def relative_to(self, other: Location) -> str:
        return posixpath.relpath(self.path, other.path)

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        # Object stores have no folders; create_dir makes a placeholder where needed.
        self.fs.create_dir(self.path, recursive=parents)

    def iterdir(self) -> list[Location]:
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return [Location(self.fs, i.path.rstrip("/"), self.prefix, self.query)
                for i in self.fs.get_file_info(selector)]

    def files(self) -> list[Location]:
        """Every file below this folder, recursively, sorted by path."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        return sorted((Location(self.fs, i.path, self.prefix, self.query) for i in self.fs.get_file_info(selector)
                       if i.type == pafs.FileType.File), key=lambda f: f.path.split("/"))

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One upload: on S3 and GCS the object appears whole when the stream closes, or not at all."""
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete this folder and everything below it (nothing if it is absent)."""
        if self.is_dir():
            self.fs.delete_dir(self.path)


Where = Union[Path, Location]


def resolve(target: str | os.PathLike | Location, filesystem: pafs.FileSystem | None = None) -> Where:
    """A local `Path` (absolute) for a plain path or a file:// URI, else a `Location`.

    `filesystem`: a pyarrow FileSystem that `target` is a path on (a LocalFileSystem gives
    a local Path; anything else, even a SubTreeFileSystem over a local folder, a Location)."""
    if isinstance(target, Location):
        return target
    if filesystem is not None:
        if isinstance(filesystem, pafs.LocalFileSystem):
            return Path(os.fspath(target)).expanduser().resolve()
        return Location(filesystem, str(target).rstrip("/") or "/")
    text = os.fspath(target)
    if "://" not in text:
        return Path(text).expanduser().resolve()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as exc:     # pyarrow raises ArrowInvalid (a ValueError) or OSError
        if "Unrecognized filesystem type" in str(exc):
            raise StorageError(f"storage URI {text!r}: pyarrow has no filesystem for {scheme}:// (it knows "
                               f"{', '.join(s + '://' for s in KNOWN_SCHEMES)}); use one of those, or a plain "
                               f"path on a shared mount") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage URI {text!r}: {first}"
                           + (f"; {CREDENTIALS_HINT}" if scheme in ("s3", "gs", "gcs") else "")) from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path).resolve()
    # Credentials in a URI (s3://KEY:SECRET@bucket) never reach logs or outputs through str().
    return Location(fs, path.rstrip("/"), f"{scheme}://", parts.query)


def check_access(where: Where) -> None:
    """Reach `where` once (a metadata request), so that refused credentials or a missing
    bucket fail before any work, naming the location."""
    if isinstance(where, Path):
        return
    try:
        where.fs.get_file_info(where.path)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot reach {where}: {first}; {CREDENTIALS_HINT}") from exc


def local_copy(target: str | os.PathLike | Location, what: str = "folder") -> Path:
    """A local folder holding what `target` holds: `target` itself when it is local;
    for a location, a copy in the local cache (`$CIR_CACHE_DIR`, default ~/.cache/cir),
    made once per version of its files (their paths, sizes and modification times) and
    renamed into place whole, so that the processes of one node share one download.
    For what only loads from a local disk: safetensors, tokenizer files, FAISS indexes."""
    import hashlib

    where = resolve(target)
    if isinstance(where, Path):
        return where
    selector = pafs.FileSelector(where.path, recursive=True, allow_not_found=True)
    try:
        infos = sorted((i for i in where.fs.get_file_info(selector) if i.type == pafs.FileType.File),
                       key=lambda i: i.path)
    except OSError as exc:
        raise StorageError(f"cannot list {what} {where}: {exc}; {CREDENTIALS_HINT}") from exc
    if not infos:
        raise FileNotFoundError(f"{what} {where}: no files there")
    listing = "\n".join(f"{i.path}\t{i.size}\t{i.mtime_ns}" for i in infos)
    digest = hashlib.sha1(f"{where}\n{listing}".encode()).hexdigest()[:16]

    def download(tmp: Path) -> None:
        for info in infos:
            dst = tmp / posixpath.relpath(info.path, where.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(dst), source_filesystem=where.fs,
                            destination_filesystem=pafs.LocalFileSystem())

    return install_dir(cache_dir() / "remote" / f"{where.name}-{digest}", download)


def install_dir(target: Path, fill) -> Path:
    """`target`, a local folder filled once by `fill(tmp)` and renamed into place whole;
    when it exists already (another process of the node renamed its copy first), it is
    kept. For caches whose name says what they hold (a digest of their source)."""
    import shutil
    import uuid

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        fill(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cache_dir() -> Path:
    """This node's cache of copies from remote storage: $CIR_CACHE_DIR, else ~/.cache/cir."""
    return Path(os.environ.get("CIR_CACHE_DIR") or "~/.cache/cir").expanduser()


def split(where: str | os.PathLike | Location) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for pyarrow's and Ray Data's `filesystem=` arguments: None and
    the path for a local one (so that they behave exactly as without the argument)."""
    if isinstance(where, Location):
        return where.fs, where.path
    return None, os.fspath(where)


def split_many(files: Iterable[str | os.PathLike | Location]) -> tuple[pafs.FileSystem | None, list[str]]:
    """(filesystem, paths) of files that all live on one filesystem."""
    files = list(files)
    pairs = [split(f) for f in files]
    first = pairs[0][0] if pairs else None
    for fs, _ in pairs:
        if (fs is None) != (first is None) or (fs is not None and not fs.equals(first)):
            raise ValueError(f"files on more than one filesystem: {[str(f) for f in files][:3]}")
    return first, [p for _, p in pairs]


def ray_read_parquet(files: Iterable[str | os.PathLike | Location], **kwargs):
    """`ray.data.read_parquet` over files (paths or locations) on their filesystem."""
    import ray

    fs, paths = split_many(files)
    return ray.data.read_parquet(paths, filesystem=fs, **kwargs)


def refs(files: Iterable[Where]) -> list:
    """Files as readers take them (`split_many`, Ray task arguments): path strings for
    local files, as they always were, and locations for the others."""
    return [f if isinstance(f, Location) else str(f) for f in files]


def upload(local: str | os.PathLike, target: Location) -> None:
    """Copy a local file to `target` in one stream: on S3 and GCS the object appears
    whole when the stream closes, or not at all."""
    import shutil

    target.parent.mkdir()
    with open(local, "rb") as src, target.fs.open_output_stream(target.path) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def copy_file(src: Where, dst: Where) -> None:
    """Copy one file between any two filesystems (local paths included)."""
    def fs_path(where):
        return (where.fs, where.path) if isinstance(where, Location) else (pafs.LocalFileSystem(), str(where))

    dst.parent.mkdir(parents=True, exist_ok=True)
    (src_fs, src_path), (dst_fs, dst_path) = fs_path(src), fs_path(dst)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def walk_files(folder: Where) -> list[Where]:
    """Every file below `folder`, recursively, sorted."""
    if isinstance(folder, Location):
        return folder.files()
    return sorted(p for p in folder.rglob("*") if p.is_file())


def remove_tree(where: Where) -> None:
    """Delete a folder and its content; nothing if it is absent."""
    if isinstance(where, Location):
        where.rmtree()
    else:
        import shutil

        shutil.rmtree(where, ignore_errors=True)


def read_json(where: Where):
    return json.loads(where.read_text())
