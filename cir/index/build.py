"""Writing and loading the index folder: shards, ids, manifest, checksums."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir.outputs import atomic_path, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
METRIC = "inner_product"        # L2-normalised embeddings: cosine


class IndexMismatch(ValueError):
    """An index folder that is corrupt, or was built for another encoder."""


@dataclass
class IndexParams:
    """How each shard is indexed. `kind` auto: exact (flat) up to `flat_limit` rows per
    shard, IVF-Flat above it, with ~2*sqrt(rows) lists (as pair mining does) searched
    `nprobe` at a time."""

    kind: str = "auto"           # auto | flat | ivf_flat
    flat_limit: int = 50_000
    nlist: int = 0               # 0: 2 * sqrt(rows per shard)
    nprobe: int = 16

    def validate(self) -> None:
        if self.kind not in ("auto", "flat", "ivf_flat"):
            raise ValueError(f"index kind must be auto, flat or ivf_flat, got {self.kind!r}")
        if self.flat_limit < 1 or self.nprobe < 1 or self.nlist < 0:
            raise ValueError(f"index params out of range: {asdict(self)}")

    def factory(self, rows: int) -> tuple[str, dict]:
        """The FAISS index-factory string and search parameters for a shard of `rows`."""
        kind = self.kind if self.kind != "auto" else ("flat" if rows <= self.flat_limit else "ivf_flat")
        if kind == "flat":
            return "Flat", {}
        # FAISS wants >= 39 training points per list.
        nlist = self.nlist or max(1, min(int(2 * math.sqrt(rows)), rows // 39))
        return f"IVF{nlist},Flat", {"nprobe": min(self.nprobe, nlist)}


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal row ranges of the id-sorted gallery."""
    if n_shards < 1:
        raise ValueError(f"shards must be >= 1, got {n_shards}")
    if n < n_shards:
        raise ValueError(f"{n} gallery rows cannot fill {n_shards} shards")
    edges = np.linspace(0, n, n_shards + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def build_shard(vectors: np.ndarray, factory: str, search: dict, seed: int = 0):
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(len(vectors), size=min(len(vectors), 40 * nlist), replace=False))]
        index.train(sample)
    index.add(vectors)
    if "nprobe" in search:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = search["nprobe"]
        ivf.make_direct_map()        # saved with it: the search rescores candidates from their vectors
    return index


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_index(folder: str | Path, ids: list[str], vectors: np.ndarray, encoder: str, n_shards: int,
                params: IndexParams | None = None) -> dict:
    """Index `vectors` (rows of `ids`, L2-normalised) into `folder` as `n_shards` shards
    of the id-sorted rows; returns the manifest. An existing index folder is refused, never overwritten."""
    import faiss

    params = params or IndexParams()
    params.validate()
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder} already holds an index; choose another output or delete it")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"need one vector per id, got {len(ids)} ids and vectors of shape {vectors.shape}")
    if len(set(ids)) != len(ids):
        raise ValueError("gallery ids must be unique")
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids, vectors = [ids[i] for i in order], vectors[order]
    shards = []
    with atomic_path(folder, directory=True) as tmp:
        for i, (lo, hi) in enumerate(shard_bounds(len(ids), n_shards)):
            factory, search = params.factory(hi - lo)
            index_file, ids_file = f"shard-{i:03d}.faiss", f"shard-{i:03d}.ids.parquet"
            faiss.write_index(build_shard(vectors[lo:hi], factory, search), str(tmp / index_file))
            pq.write_table(pa.table({"image_id": ids[lo:hi]}), tmp / ids_file)
            shards.append({"index": index_file, "ids": ids_file, "rows": hi - lo, "factory": factory,
                           "search": search, "sha256": {f: file_sha256(tmp / f) for f in (index_file, ids_file)}})
        manifest = {"format_version": FORMAT_VERSION, "encoder": encoder, "dim": int(vectors.shape[1]),
                    "metric": METRIC, "rows": len(ids), "params": asdict(params), "shards": shards}
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an index folder (no {MANIFEST}); build one with jobs/index.py")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexMismatch(f"{path}: index format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
    return manifest


def check_encoder(manifest: dict, encoder: str, dim: int) -> None:
    """The serving encoder must be the one the gallery was encoded with."""
    if manifest["encoder"] != encoder or manifest["dim"] != dim:
        raise IndexMismatch(f"the index was built with encoder {manifest['encoder']!r} (dim {manifest['dim']}), "
                            f"but queries come from {encoder!r} (dim {dim}): rebuild the index with this encoder")


def load_shard(folder: str | Path, shard: int, manifest: dict | None = None, mmap: bool = True,
               verify: bool = True):
    """(FAISS index, ids) of one shard; the files' checksums are checked first. The
    vectors are memory-mapped (`mmap`), so a replica need not hold its shard in RAM."""
    import faiss

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    entry = manifest["shards"][shard]
    if verify:
        for name, digest in entry["sha256"].items():
            if not (folder / name).is_file() or file_sha256(folder / name) != digest:
                raise IndexMismatch(f"{folder / name} is missing or corrupt (checksum differs from {MANIFEST})")
    path = str(folder / entry["index"])
    # FAISS maps a flat index's vectors with MMAP_IFC and an IVF index's lists with MMAP.
    flag = (faiss.IO_FLAG_MMAP_IFC if entry["factory"] == "Flat" else faiss.IO_FLAG_MMAP) if mmap else 0
    index = faiss.read_index(path, flag)
    if "nprobe" in entry["search"]:
        faiss.extract_index_ivf(index).nprobe = entry["search"]["nprobe"]
    ids = pq.read_table(folder / entry["ids"]).column("image_id").to_pylist()
    if index.ntotal != len(ids) or len(ids) != entry["rows"]:
        raise IndexMismatch(f"shard {shard} of {folder}: {index.ntotal} vectors, {len(ids)} ids, "
                            f"{entry['rows']} in the manifest")
    return index, np.asarray(ids, dtype=object)
