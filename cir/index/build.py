"""Writing and loading the index folder: shards, ids, manifest, checksums."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir.outputs import atomic_path, file_sha256, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
METRIC = "inner_product"        # L2-normalised embeddings: cosine


class IndexMismatch(ValueError):
    """An index folder that is corrupt, or was built for another encoder."""


@dataclass
class IndexParams:
    """How each shard is indexed. `kind` auto: exact (flat) up to `flat_limit` rows per
    shard, IVF-Flat above it, with 4*sqrt(rows) lists (FAISS's guideline). The lists
    probed per query are tuned on the shard (as autofaiss tunes search parameters): the
    fewest, from `nprobe` up, whose recall@10 against exact search reaches
    `target_recall` on a sample of the shard's own vectors (0: use `nprobe` as is)."""

    kind: str = "auto"           # auto | flat | ivf_flat
    flat_limit: int = 50_000
    nlist: int = 0               # 0: 4 * sqrt(rows per shard)
    nprobe: int = 16
    # Tuned on the shard's own vectors; held-out queries score a little lower, hence 0.96.
    target_recall: float = 0.96

    def validate(self) -> None:
        if self.kind not in ("auto", "flat", "ivf_flat"):
            raise ValueError(f"index kind must be auto, flat or ivf_flat, got {self.kind!r}")
        if self.flat_limit < 1 or self.nprobe < 1 or self.nlist < 0 or not 0 <= self.target_recall <= 1:
            raise ValueError(f"index params out of range: {asdict(self)}")

    def factory(self, rows: int) -> tuple[str, dict]:
        """The FAISS index-factory string and search parameters for a shard of `rows`."""
        kind = self.kind if self.kind != "auto" else ("flat" if rows <= self.flat_limit else "ivf_flat")
        if kind == "flat":
            return "Flat", {}
        # FAISS wants >= 39 training points per list.
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(rows)), rows // 39))
        return f"IVF{nlist},Flat", {"nprobe": min(self.nprobe, nlist)}


def shard_of(ids, n_shards: int) -> np.ndarray:
    """The shard of each id (a hash of it): stable across runs and machines, and
    independent of row order, so a task can pick its shard's rows from any table."""
    import zlib

    if n_shards < 1:
        raise ValueError(f"shards must be >= 1, got {n_shards}")
    return np.asarray([zlib.crc32(i.encode()) % n_shards for i in ids], dtype=np.int64)


def shard_rows(ids, n_shards: int) -> list[np.ndarray]:
    """The row positions of each shard; an empty shard is an error."""
    shard = shard_of(ids, n_shards)
    rows = [np.flatnonzero(shard == i) for i in range(n_shards)]
    empty = [i for i, r in enumerate(rows) if not len(r)]
    if empty:
        raise ValueError(f"{len(ids)} gallery rows leave shard(s) {empty} of {n_shards} empty: use fewer shards")
    return rows


def build_shard(vectors: np.ndarray, factory: str, search: dict, seed: int = 0, target_recall: float = 0.0):
    """A FAISS index over `vectors`; an IVF one gets `search["nprobe"]` raised until the
    recall target is met (the chosen value is written back into `search`)."""
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
        if target_recall:
            search["nprobe"] = tune_nprobe(index, vectors, search["nprobe"], target_recall, seed)
            ivf.nprobe = search["nprobe"]
        ivf.make_direct_map()        # saved with it: the search rescores candidates from their vectors
    return index


def tune_nprobe(index, vectors: np.ndarray, start: int, target: float, seed: int = 0,
                queries: int = 1000, k: int = 10) -> int:
    """The fewest probed lists (from `start`, x1.5 a step) whose recall@k on a sample of the
    shard's own vectors, each query's own row left out, reaches `target`."""
    import faiss

    rng = np.random.default_rng(seed + 1)
    q = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    truth = exact.search(q, k + 1)[1][:, 1:]
    ivf = faiss.extract_index_ivf(index)
    nprobe = start
    while True:
        ivf.nprobe = min(nprobe, ivf.nlist)
        found = index.search(q, k + 1)[1][:, 1:]
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)])
        if recall >= target or ivf.nprobe >= ivf.nlist:
            return int(ivf.nprobe)
        nprobe = max(nprobe + 1, int(nprobe * 1.5))


def write_shard(folder: Path, shard: int, ids: list[str], vectors: np.ndarray, params: IndexParams) -> dict:
    """Index one shard's rows (sorted by id) into `folder`; returns its manifest entry.
    A Ray task per shard runs this in the index job."""
    import faiss

    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids, vectors = [ids[i] for i in order], np.ascontiguousarray(vectors[order], dtype=np.float32)
    factory, search = params.factory(len(ids))
    index_file, ids_file = f"shard-{shard:03d}.faiss", f"shard-{shard:03d}.ids.parquet"
    faiss.write_index(build_shard(vectors, factory, search, target_recall=params.target_recall),
                      str(folder / index_file))
    pq.write_table(pa.table({"image_id": ids}), folder / ids_file)
    return {"index": index_file, "ids": ids_file, "rows": len(ids), "factory": factory, "search": search,
            "sha256": {f: file_sha256(folder / f) for f in (index_file, ids_file)}}


def index_manifest(encoder: str, dim: int, params: IndexParams, shards: list[dict]) -> dict:
    return {"format_version": FORMAT_VERSION, "encoder": encoder, "dim": int(dim), "metric": METRIC,
            "rows": sum(s["rows"] for s in shards), "params": asdict(params), "shards": shards}


def check_gallery(ids: list[str], vectors: np.ndarray) -> None:
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"need one vector per id, got {len(ids)} ids and vectors of shape {vectors.shape}")
    if len(set(ids)) != len(ids):
        raise ValueError("gallery ids must be unique")


def write_index(folder: str | Path, ids: list[str], vectors: np.ndarray, encoder: str, n_shards: int,
                params: IndexParams | None = None) -> dict:
    """Index `vectors` (rows of `ids`, L2-normalised) into `folder` as `n_shards` shards
    (`shard_of`), in this process; returns the manifest. An existing index folder is
    refused, never overwritten."""
    params = params or IndexParams()
    params.validate()
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder} already holds an index; choose another output or delete it")
    vectors = np.asarray(vectors, dtype=np.float32)
    check_gallery(ids, vectors)
    parts = shard_rows(ids, n_shards)
    with atomic_path(folder, directory=True) as tmp:
        shards = [write_shard(tmp, i, [ids[j] for j in rows], vectors[rows], params) for i, rows in enumerate(parts)]
        manifest = index_manifest(encoder, vectors.shape[1], params, shards)
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
