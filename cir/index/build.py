"""Writing and loading the index folder: shards, ids, manifest, checksums; and the
choice of each shard's FAISS index from its size and a memory budget."""
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
MIB = 1 << 20

# The rules taken from autofaiss (external/optimize.py, external/metadata.py):
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # its PQ code sizes in bytes (8 bits per sub-quantiser)
PQ_MIN_ROWS = 10_000     # its quantization_threshold: each sub-quantiser's k-means fits 256 codes
ID_BYTES = 8             # an idx_t per row in the inverted lists, and one in the direct map
HNSW_M = 32              # links per vector (autofaiss's largest)
EF_SEARCH_START = 16     # the lowest efSearch it tries (FAISS's default)
EF_SEARCH_LIMIT = 2 ** 14  # the highest it tries

KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")


class IndexMismatch(ValueError):
    """An index folder that is corrupt, or was built for another encoder."""


@dataclass
class IndexParams:
    """How each shard is indexed (`plan_index` chooses, `IndexPlan` says what).

    `kind` auto: exact (flat) up to `flat_limit` rows per shard; above it IVF-Flat with
    4*sqrt(rows) lists (FAISS's guideline), or, where that exceeds `memory_budget_mb`
    (MiB of RAM a served shard's index may take; 0: no limit), IVF-PQ with the largest
    code that fits. `hnsw` (HNSW32 over the full vectors) only when asked for: it is read
    whole into RAM (its graph cannot be mapped) and is larger than IVF-Flat, for faster
    search. The search
    parameter (IVF's probed lists, HNSW's efSearch) is tuned on the shard, as autofaiss
    tunes it: the least, from `nprobe` (efSearch: 16) up, whose recall@10 against exact
    search reaches `target_recall` on a sample of the shard's own vectors (0: as is).
    Training (IVF's k-means, PQ's codebooks) runs on the GPUs when FAISS sees any
    (`gpu` auto), always (true: it fails where there are none) or never (false)."""

    kind: str = "auto"           # auto | flat | ivf_flat | ivf_pq | hnsw
    flat_limit: int = 50_000
    memory_budget_mb: float = 0  # per shard; 0: no limit
    nlist: int = 0               # 0: 4 * sqrt(rows per shard)
    nprobe: int = 16
    # Tuned on the shard's own vectors; held-out queries score a little lower, hence 0.96.
    target_recall: float = 0.96
    gpu: bool | str = "auto"

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.gpu not in (True, False, "auto"):
            raise ValueError(f"index gpu must be auto, true or false, got {self.gpu!r}")
        if (self.flat_limit < 1 or self.nprobe < 1 or self.nlist < 0 or self.memory_budget_mb < 0
                or not 0 <= self.target_recall <= 1):
            raise ValueError(f"index params out of range: {asdict(self)}")


@dataclass(frozen=True)
class IndexPlan:
    """One shard's FAISS index: its type, lists (IVF) and PQ code size in bytes."""

    kind: str                    # flat | ivf_flat | ivf_pq | hnsw
    nlist: int = 0
    pq_m: int = 0

    @property
    def factory(self) -> str:
        return {"flat": "Flat", "ivf_flat": f"IVF{self.nlist},Flat", "ivf_pq": f"IVF{self.nlist},PQ{self.pq_m}x8",
                "hnsw": f"HNSW{HNSW_M}"}[self.kind]

    def memory_bytes(self, rows: int, dim: int) -> int:
        """RAM the index takes when served: autofaiss's estimate (its IndexMetadata),
        with the direct map the searcher's rescoring needs, plus the inverted lists'
        ids for IVF-Flat too (autofaiss counts them for PQ only) and PQ's codebooks."""
        centroids = self.nlist * dim * 4
        return {"flat": rows * dim * 4,
                "ivf_flat": rows * (dim * 4 + 2 * ID_BYTES) + centroids,
                "ivf_pq": rows * (self.pq_m + 2 * ID_BYTES) + centroids + 256 * dim * 4,
                "hnsw": rows * (dim * 4 + HNSW_M * 2 * 4)}[self.kind]

    @property
    def train_rows(self) -> int:
        """Vectors to train on: 40 per centroid (FAISS warns under 39), for IVF's lists
        and for PQ's 256 codes per sub-quantiser; 0: nothing to train."""
        if self.kind not in ("ivf_flat", "ivf_pq"):
            return 0
        return 40 * max(self.nlist, 256 if self.kind == "ivf_pq" else 1)

    def search_start(self, params: IndexParams) -> dict:
        """The search parameter and the value its tuning starts from."""
        if self.kind == "hnsw":
            return {"efSearch": EF_SEARCH_START}
        return {"nprobe": min(params.nprobe, self.nlist)} if self.nlist else {}

    def search_limit(self, rows: int) -> int:
        return self.nlist if self.nlist else min(rows, EF_SEARCH_LIMIT)


def plan_index(params: IndexParams, rows: int, dim: int) -> IndexPlan:
    """The index of a shard of `rows` vectors of `dim`: the first of `params.kind`'s
    candidates (auto: Flat up to `flat_limit` rows, IVF-Flat, IVF-PQ from the largest
    code down) whose `memory_bytes` fits `params.memory_budget_mb`. None fitting is an
    error naming the budget the smallest candidate needs.

    From autofaiss's get_optimal_index_keys_v2: IVF-Flat while it fits the budget, else
    PQ with the largest code size that fits (its sizes, each < dim; here also dividing
    dim, as there is no OPQ rotation to pad it), none below 10,000 rows. Not taken: its
    HNSW-first choice (not memory-mappable), its IVF-Flat cap at 1M rows (the budget
    decides here), its power-of-two and 16k+ list counts (4*sqrt(rows) stays)."""
    nlist = params.nlist or max(1, min(int(4 * math.sqrt(rows)), rows // 39))   # >= 39 training points per list
    quantised = ([IndexPlan("ivf_pq", nlist, m) for m in PQ_SIZES if m < dim and dim % m == 0]
                 if rows >= PQ_MIN_ROWS else [])
    flat, ivf_flat = [IndexPlan("flat")], [IndexPlan("ivf_flat", nlist)]
    candidates = {"auto": (flat if rows <= params.flat_limit else []) + ivf_flat + quantised, "flat": flat,
                  "ivf_flat": ivf_flat, "ivf_pq": quantised, "hnsw": [IndexPlan("hnsw")]}[params.kind]
    if not candidates:
        raise ValueError(f"IVF-PQ needs >= {PQ_MIN_ROWS} rows per shard and a dim divisible by one of "
                         f"{', '.join(map(str, PQ_SIZES))} (got {rows} rows of dim {dim}): use another index kind")
    budget = params.memory_budget_mb * MIB     # 0: no limit
    for plan in candidates:
        if not budget or plan.memory_bytes(rows, dim) <= budget:
            return plan
    need = min(candidates, key=lambda p: p.memory_bytes(rows, dim))
    raise ValueError(f"a shard of {rows} vectors of dim {dim} needs at least "
                     f"{need.memory_bytes(rows, dim) / MIB:.3g} MiB ({need.factory}), over "
                     f"index.memory_budget_mb={params.memory_budget_mb}: raise the budget or use more shards")


def shard_of(ids, n_shards: int) -> np.ndarray:
    """The shard of each id (a hash of it): stable across runs and machines, and
    independent of row order, so a task can pick its shard's rows from any table."""
    import zlib

    if n_shards < 1:
        raise ValueError(f"shards must be >= 1, got {n_shards}")
    return np.asarray([zlib.crc32(i.encode()) % n_shards for i in ids], dtype=np.int64)


def check_shard_sizes(sizes: list[int]) -> None:
    """An empty shard is an error: too few rows for that many shards."""
    empty = [i for i, n in enumerate(sizes) if not n]
    if empty:
        raise ValueError(f"{sum(sizes)} gallery rows leave shard(s) {empty} of {len(sizes)} empty: use fewer shards")


def shard_rows(ids, n_shards: int) -> list[np.ndarray]:
    """The row positions of each shard; an empty shard is an error."""
    shard = shard_of(ids, n_shards)
    rows = [np.flatnonzero(shard == i) for i in range(n_shards)]
    check_shard_sizes([len(r) for r in rows])
    return rows


def use_gpu(setting: bool | str) -> bool:
    """Whether to train on GPUs (`IndexParams.gpu`): FAISS is asked whether it sees any
    (faiss-gpu on a GPU node does; faiss-cpu, or a Ray task given no GPU, does not)."""
    from cir.mining import faiss_gpu_count

    if setting is False:
        return False
    gpus = faiss_gpu_count()
    if setting is True and not gpus:
        raise ValueError("index.gpu is true but FAISS sees no GPU here (faiss-cpu, or none given to this "
                         "process): install faiss-gpu on a GPU node, or set index.gpu to auto")
    return gpus > 0


def train_index(plan: IndexPlan, dim: int, sample: np.ndarray | None, gpu: bool | str = "auto") -> np.ndarray:
    """An empty index of `plan`, trained on `sample` where it needs training, serialised
    (`faiss.serialize_index`) for every shard to add its rows to: one coarse quantiser
    and one set of PQ codebooks for all shards, so equal vectors decode equally in every
    shard and their ties still merge by id. On GPUs (`use_gpu`) the k-means assign with
    GPU flat indexes while the index itself stays on the CPU, ready to write."""
    import faiss

    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "ivf_pq":
        index.do_polysemous_training = False    # only for Hamming filtering, unused; slow
    if not index.is_trained:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        product = getattr(ivf, "pq", None)      # IVF-PQ's product quantiser
        # Held in locals: FAISS does not own them, and they must outlive the training.
        on_gpu = use_gpu(gpu)
        coarse = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(dim, ivf.metric_type)) if on_gpu else None
        sub = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(product.dsub)) if on_gpu and product is not None else None
        ivf.clustering_index = coarse
        if product is not None:
            product.assign_index = sub
        try:
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        finally:
            ivf.clustering_index = None
            if product is not None:
                product.assign_index = None
    return faiss.serialize_index(index)


def training_sample(vectors: np.ndarray, plan: IndexPlan, seed: int = 0) -> np.ndarray | None:
    """`plan.train_rows` of `vectors` at random (all of them if fewer); None if untrained."""
    if not plan.train_rows:
        return None
    rng = np.random.default_rng(seed)
    return vectors[np.sort(rng.choice(len(vectors), size=min(len(vectors), plan.train_rows), replace=False))]


def build_shard(vectors: np.ndarray, trained: np.ndarray, plan: IndexPlan, params: IndexParams,
                seed: int = 0) -> tuple:
    """(index, search parameters): `vectors` added to the `trained` index, its search
    parameter tuned to `params.target_recall` (`tune_search`)."""
    import faiss

    index = faiss.deserialize_index(trained)
    index.add(vectors)
    search = plan.search_start(params)
    for name, value in search.items():
        if params.target_recall:
            value = tune_search(index, vectors, name, value, plan.search_limit(len(vectors)),
                                params.target_recall, seed)
        faiss.ParameterSpace().set_index_parameter(index, name, value)
        search[name] = value
    if plan.nlist:
        faiss.extract_index_ivf(index).make_direct_map()   # saved with it: the search rescores from the vectors
    return index, search


def tune_search(index, vectors: np.ndarray, name: str, start: int, limit: int, target: float, seed: int = 0,
                queries: int = 1000, k: int = 10) -> int:
    """The least value of search parameter `name` (nprobe, efSearch), from `start` up
    to `limit`, x1.5 a step, whose recall@k on a sample of the shard's own vectors (each
    query's own row left out) reaches `target`. Where no value does (PQ's quantisation
    caps recall), the least within 0.01 of the best recall seen."""
    import faiss

    rng = np.random.default_rng(seed + 1)
    rows = rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    truth = _neighbours(exact, vectors[rows], rows, k)
    tried, value = {}, start
    while True:
        value = min(value, limit)
        faiss.ParameterSpace().set_index_parameter(index, name, value)
        found = _neighbours(index, vectors[rows], rows, k)
        tried[value] = np.mean([len(a & b) / k for a, b in zip(truth, found)])
        if tried[value] >= target or value >= limit:
            break
        value = max(value + 1, int(value * 1.5))
    if tried[value] >= target:
        return int(value)
    best = max(tried.values())
    return int(min(v for v, recall in tried.items() if recall >= best - 0.01))


def _neighbours(index, queries: np.ndarray, rows: np.ndarray, k: int) -> list[set]:
    """Each query's k nearest rows other than its own."""
    found = index.search(queries, k + 1)[1]
    return [set([i for i in f if i != row and i >= 0][:k]) for f, row in zip(found, rows)]


def write_shard(folder: Path, shard: int, ids: list[str], vectors: np.ndarray, params: IndexParams,
                plan: IndexPlan, trained: np.ndarray) -> dict:
    """Index one shard's rows (sorted by id) into `folder`; returns its manifest entry.
    A Ray task per shard runs this in the index job."""
    import faiss

    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ids, vectors = [ids[i] for i in order], np.ascontiguousarray(vectors[order], dtype=np.float32)
    index, search = build_shard(vectors, trained, plan, params)
    index_file, ids_file = f"shard-{shard:03d}.faiss", f"shard-{shard:03d}.ids.parquet"
    faiss.write_index(index, str(folder / index_file))
    pq.write_table(pa.table({"image_id": ids}), folder / ids_file)
    return {"index": index_file, "ids": ids_file, "rows": len(ids), "factory": plan.factory, "search": search,
            "estimated_memory_mb": round(plan.memory_bytes(len(ids), vectors.shape[1]) / MIB, 1),
            "sha256": {f: file_sha256(folder / f) for f in (index_file, ids_file)}}


def index_manifest(encoder: str, dim: int, params: IndexParams, shards: list[dict],
                   image_encoder: str | None = None) -> dict:
    """`encoder` (with `image_encoder`, the tower of a baseline:... spec) is what encoded
    the gallery; serving checks its model against it (`check_encoder`)."""
    return {"format_version": FORMAT_VERSION, "encoder": encoder, "image_encoder": image_encoder, "dim": int(dim),
            "metric": METRIC, "rows": sum(s["rows"] for s in shards), "params": asdict(params), "shards": shards}


def check_gallery(ids: list[str], vectors: np.ndarray) -> None:
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ValueError(f"need one vector per id, got {len(ids)} ids and vectors of shape {vectors.shape}")
    if len(set(ids)) != len(ids):
        raise ValueError("gallery ids must be unique")


def write_index(folder: str | Path, ids: list[str], vectors: np.ndarray, encoder: str, n_shards: int,
                params: IndexParams | None = None) -> dict:
    """Index `vectors` (rows of `ids`, L2-normalised) into `folder` as `n_shards` shards
    (`shard_of`), in this process; returns the manifest. An existing index folder is
    refused, never overwritten; so is a memory budget too small, before any work."""
    params = params or IndexParams()
    params.validate()
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder} already holds an index; choose another output or delete it")
    vectors = np.asarray(vectors, dtype=np.float32)
    check_gallery(ids, vectors)
    parts = shard_rows(ids, n_shards)
    # One plan for all shards (hashing makes them near equal), sized for the largest.
    plan = plan_index(params, max(len(p) for p in parts), vectors.shape[1])
    trained = train_index(plan, vectors.shape[1], training_sample(vectors, plan), params.gpu)
    with atomic_path(folder, directory=True) as tmp:
        shards = [write_shard(tmp, i, [ids[j] for j in rows], vectors[rows], params, plan, trained)
                  for i, rows in enumerate(parts)]
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


def check_encoder(manifest: dict, encoder: str, dim: int | None = None, image_encoder: str | None = None) -> None:
    """Queries from `encoder` (an open_clip name or a query-encoder spec, with the tower
    `image_encoder` of a baseline) must land in the space the gallery was encoded into:
    the same gallery side (`query_encoders.gallery_identity`) and, when given, dim."""
    from cir.query_encoders import gallery_identity

    built = gallery_identity(manifest["encoder"], manifest.get("image_encoder"))
    serving = gallery_identity(encoder, image_encoder)
    if built != serving or (dim is not None and manifest["dim"] != dim):
        raise IndexMismatch(f"the index was built for {built} (dim {manifest['dim']}), but queries come from "
                            f"{encoder!r} ({serving}{f', dim {dim}' if dim is not None else ''}): "
                            "rebuild the index with this model (jobs/index.py)")


def mmap_flag(factory: str) -> int:
    """How FAISS maps a shard of this type: a flat index's vectors with IO_FLAG_MMAP_IFC,
    an IVF index's lists with IO_FLAG_MMAP; an HNSW index is read whole into RAM."""
    import faiss

    if factory == "Flat":
        return faiss.IO_FLAG_MMAP_IFC
    return faiss.IO_FLAG_MMAP if factory.startswith("IVF") else 0


def load_shard(folder: str | Path, shard: int, manifest: dict | None = None, mmap: bool = True,
               verify: bool = True):
    """(FAISS index, ids) of one shard, its search parameters set; the files' checksums
    are checked first. Memory-mapped where the type allows (`mmap_flag`), so a replica
    need not hold its shard in RAM."""
    import faiss

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    entry = manifest["shards"][shard]
    if verify:
        for name, digest in entry["sha256"].items():
            if not (folder / name).is_file() or file_sha256(folder / name) != digest:
                raise IndexMismatch(f"{folder / name} is missing or corrupt (checksum differs from {MANIFEST})")
    index = faiss.read_index(str(folder / entry["index"]), mmap_flag(entry["factory"]) if mmap else 0)
    for name, value in entry["search"].items():
        faiss.ParameterSpace().set_index_parameter(index, name, value)
    ids = pq.read_table(folder / entry["ids"]).column("image_id").to_pylist()
    if index.ntotal != len(ids) or len(ids) != entry["rows"]:
        raise IndexMismatch(f"shard {shard} of {folder}: {index.ntotal} vectors, {len(ids)} ids, "
                            f"{entry['rows']} in the manifest")
    return index, np.asarray(ids, dtype=object)
