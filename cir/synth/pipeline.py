"""The synth job: corpus -> embeddings -> pairs -> triplets, on Ray Data.

Each stage writes one table folder under the output directory (see `cir.outputs`):
a rerun with the same output skips finished stages, and a stage whose settings
changed is refused rather than silently reused. The output may be a local folder, a
URI (`s3://`, `gs://`, `file://`) or a path on a given pyarrow filesystem
(`cir.storage`): every table is read and written through that filesystem, by this
process and by the Ray Data tasks on other nodes. The caller has done `ray.init()`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from cir.actor_pool import explain_actor_deaths
from cir.data import corpus as corpus_io
from cir.outputs import OutputDir, count_rows, parquet_file, parquet_files, read_table, write_table
from cir.progress import log
from cir.storage import ray_read_parquet, refs, remove_tree, resolve, split
from cir.synth.config import SynthConfig
from cir.synth.triplets import generate_triplets

STAGES = ("corpus", "captions", "embeddings", "pairs", "triplets")   # captions: only when asked
GENERATED = "_generated"     # the triplets stage's generated rows until it is committed


@dataclass
class StageResult:
    rows: int
    seconds: float
    path: str
    skipped: bool
    extra: dict = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class SynthSummary:
    output: str
    stages: dict[str, StageResult]
    bad_images: list[dict]
    rejected: str = ""      # where the quality filter's dropped rows are


def _file_refs(folder) -> list:
    """A table's files as the readers take them: path strings locally, locations elsewhere."""
    return refs(parquet_files(folder))


class SynthRun:
    """One run of the synth job over an output folder: `cfg.output` is a path or a URI, or
    a path on `filesystem` (any pyarrow FileSystem, e.g. an S3FileSystem with its own
    endpoint and credentials)."""

    def __init__(self, cfg: SynthConfig, filesystem=None):
        cfg.validate()
        self.cfg = cfg
        self.out = OutputDir(cfg.output, filesystem)     # refused credentials fail here
        self.kind = corpus_kind = corpus_io.corpus_kind(cfg.corpus.source)
        from cir.generate import build_backend

        self.backend = build_backend(cfg.generate)
        self.corpus_files: list = []     # path strings, or cir.storage locations
        self.fingerprints: dict[str, dict] = {}
        # Fail on bad input before any output exists.
        if corpus_kind == "parquet":
            self.corpus_files = corpus_io.parquet_corpus_files(cfg.corpus.source)
            corpus_io.check_parquet_corpus(self.corpus_files, self._captions_needed())
        elif corpus_kind == "folder":
            self.folder_corpus = corpus_io.scan_image_folder(cfg.corpus.source)
            self._check_folder_captions()

    def _captions_needed(self) -> bool:
        """The corpus must bring its captions: the backend reads them and no captions
        step writes them."""
        return self.backend.needs_captions and not self.cfg.captions.active

    def _check_folder_captions(self) -> None:
        if not self._captions_needed():
            return
        folder = corpus_io.local_source(self.cfg.corpus.source)
        if corpus_io.read_captions_file(folder) is None:
            raise ValueError(
                f"image folder {folder} has no {' or '.join(corpus_io.CAPTION_FILES)}, "
                f"and the {self.cfg.generate.backend!r} backend needs a caption per image")
        if self.folder_corpus.column("caption").null_count == self.folder_corpus.num_rows:
            raise ValueError(f"the captions file in {folder} matches none of its image files")

    # -- stages ---------------------------------------------------------------
    def run(self) -> SynthSummary:
        self.backend.check_cluster()       # e.g. vLLM on a cluster without GPUs: refuse now
        if self.cfg.captions.captioner == "vllm":
            from cir.synth.captions import vllm_backend

            vllm_backend(self.cfg.captions).check_cluster()
        self.out.clean_stale()
        results = {"corpus": self.stage_corpus()}
        if self.cfg.captions.active:
            results["captions"] = self.stage_captions()
        results["embeddings"] = self.stage_embeddings()
        results["pairs"] = self.stage_pairs()
        results["triplets"] = self.stage_triplets()
        bad = self.out.manifest("embeddings").get("bad_images", [])
        return SynthSummary(str(self.out.root), results, bad, str(self.out.path("rejected")))

    def _run_stage(self, name: str, fingerprint: dict, work) -> StageResult:
        self.fingerprints[name] = fingerprint

        def commit(tmp):
            with explain_actor_deaths(name):
                extra = work(tmp) or {}
            return {"rows": count_rows(tmp), "extra": {k: v for k, v in extra.items() if k != "bad_images"},
                    "bad_images": extra.get("bad_images", [])}

        m, skipped = self.out.run_stage(name, fingerprint, commit)
        return StageResult(m["rows"], m["seconds"], str(self.out.path(name)), skipped, m.get("extra", {}))

    def stage_corpus(self) -> StageResult:
        c = self.cfg.corpus
        if self.kind == "parquet":
            rows = sum(parquet_file(f).metadata.num_rows for f in self.corpus_files)
            self.fingerprints["corpus"] = {"source": str(resolve(c.source))}
            return StageResult(rows, 0.0, str(resolve(c.source)), True, {"kind": "parquet"})
        if self.kind == "shapes":
            fp = {"source": "shapes", **asdict(c.shapes)}

            def work(tmp):
                from cir.data.shapes_corpus import write_corpus_files

                write_corpus_files(tmp / "shapes", c.shapes.n_images, seed=c.shapes.seed,
                                   image_size=c.shapes.image_size, family_size=c.shapes.family_size)
                return {"kind": "shapes"}
        else:
            fp = {"source": str(resolve(c.source))}

            def work(tmp):
                write_table(self.folder_corpus, tmp, self.cfg.rows_per_file)
                return {"kind": "folder"}

        result = self._run_stage("corpus", fp, work)
        self.corpus_files = _file_refs(self.out.path("corpus"))
        return result

    def stage_captions(self) -> StageResult:
        """The corpus with its missing captions written (`cir.synth.captions`); the later
        stages read this table instead of the source corpus."""
        c = self.cfg.captions
        fp = {**c.fingerprint(), "filter": {"min_words": self.cfg.filter.min_words,
                                            "max_words": self.cfg.filter.max_words},
              "corpus": self.fingerprints["corpus"]}

        def work(tmp):
            from cir.synth.captions import caption_dataset

            before = corpus_io.read_captions(self.corpus_files).column("caption").null_count
            fs, path = split(tmp)
            caption_dataset(ray_read_parquet(self.corpus_files), c, self.cfg.filter).write_parquet(
                path, filesystem=fs, min_rows_per_file=min(self.cfg.rows_per_file, 10_000))
            after = corpus_io.read_captions(_file_refs(tmp)).column("caption").null_count
            return {"missing_before": before, "missing_after": after, "captioner": c.captioner}

        result = self._run_stage("captions", fp, work)
        self.corpus_files = _file_refs(self.out.path("captions"))
        return result

    def stage_embeddings(self) -> StageResult:
        e = self.cfg.encode
        fp = {"model": e.model, "corpus": self.fingerprints["corpus"]}

        def work(tmp):
            from cir.embed import embed, write_embeddings
            from cir.encoders import validate_encoder_name
            from cir.raycluster import gpus_per_actor

            schema = parquet_file(self.corpus_files[0]).schema_arrow
            columns = ["image_id"] + [c for c in ("image", "path") if c in schema.names]
            images = ray_read_parquet(self.corpus_files).select_columns(columns)
            name = str(validate_encoder_name(e.model))
            report = write_embeddings(embed(images, e.model, e), tmp, name, self.cfg.rows_per_file)
            if report.rows == 0:
                raise ValueError(f"no image of the corpus could be read ({len(report.bad)} failed)")
            return {"bad_images": report.bad, "dim": report.dim, "model": name,
                    "gpus_per_actor": gpus_per_actor(e.gpus_per_actor)}

        return self._run_stage("embeddings", fp, work)

    def stage_pairs(self) -> StageResult:
        m = self.cfg.mine
        fp = {**asdict(m), "embeddings": self.fingerprints["embeddings"]}

        def work(tmp):
            from cir.embed import read_embeddings
            from cir.mining import mine_pairs

            ids, vectors, _ = read_embeddings(self.out.path("embeddings"))
            categories = None
            if m.same_category:
                cats = corpus_io.read_captions(self.corpus_files)
                lookup = dict(zip(cats.column("image_id").to_pylist(), cats.column("category").to_pylist()))
                categories = [lookup.get(i) for i in ids]
            pairs = mine_pairs(ids, vectors, m.mining(), categories)
            write_table(pairs, tmp, self.cfg.rows_per_file)
            return {"images": len(ids)}

        return self._run_stage("pairs", fp, work)

    def stage_triplets(self) -> StageResult:
        g = self.cfg.generate
        fp = {**self.backend.fingerprint(), "pairs": self.fingerprints["pairs"]}
        if "captions" in self.fingerprints:
            fp["captions"] = self.fingerprints["captions"]
        # Keys only where set, so that triplets made before these settings existed resume.
        if g.max_pairs:
            fp["max_pairs"] = g.max_pairs
        if self._filter_active():
            fp["filter"] = asdict(self.cfg.filter)

        if self.backend.needs_corpus:
            self.backend.corpus_files = self.corpus_files

        def work(tmp):
            pairs = with_captions(read_table(self.out.path("pairs")), corpus_io.read_captions(self.corpus_files))
            if pairs.num_rows == 0:
                raise ValueError("mining found no pairs in the similarity band; widen mine.band or raise mine.k")
            if g.max_pairs:
                pairs = sample_pairs(pairs, g.max_pairs)
            if self._direction_encoder():
                from cir.embed import read_embeddings
                from cir.generate.quality import pair_directions

                ids, vectors, _ = read_embeddings(self.out.path("embeddings"))
                pairs = pairs.append_column("direction", pair_directions(
                    pairs.column("ref_id").to_pylist(), pairs.column("tgt_id").to_pylist(), ids, vectors))
            counts = generate_triplets(self.backend, self._quality_filter(), pairs, tmp,
                                       self.out.path("rejected"), self.cfg.generate, self.cfg.rows_per_file,
                                       store / digest)
            return {"pairs": pairs.num_rows, **({"filter": counts} if counts else {})}

        # Generated rows outlive a crash here (cir.synth.triplets); another digest's are stale.
        store = self.out.path(GENERATED)
        digest = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
        for other in (store.iterdir() if store.is_dir() else []):
            if other.name != digest:
                remove_tree(other)
        result = self._run_stage("triplets", fp, work)
        remove_tree(store)
        return result

    # -- the quality filter of generated texts (cir.generate.quality) -----------
    def _filter_active(self) -> bool:
        return self.cfg.filter.active(self.backend.source)

    def _direction_encoder(self) -> str | None:
        """The encoder whose text tower scores directions, or None when the check is off:
        no threshold, or an encoder with random weights (its text tower scores noise)."""
        from cir.encoders import parse_encoder_name

        f = self.cfg.filter
        if not self._filter_active() or f.min_direction_score is None:
            return None
        if parse_encoder_name(self.cfg.encode.model).pretrained is None:
            log(f"filter: direction check off: {self.cfg.encode.model} has random weights")
            return None
        return self.cfg.encode.model

    def _quality_filter(self) -> dict | None:
        """The QualityFilter's constructor arguments, or None when the filter is off."""
        if not self._filter_active():
            return None
        return {"cfg": self.cfg.filter, "encoder": self._direction_encoder(), "threads": self.cfg.encode.torch_threads}

def sample_pairs(pairs: pa.Table, n: int) -> pa.Table:
    """At most `n` pairs, a sample that depends only on the pair ids (stable across runs
    and across `n`: a larger sample contains a smaller one), in pair order."""
    import hashlib

    if pairs.num_rows <= n:
        return pairs
    keys = [hashlib.sha1(p.encode()).hexdigest() for p in pairs.column("pair_id").to_pylist()]
    chosen = sorted(sorted(range(len(keys)), key=keys.__getitem__)[:n])
    return pairs.take(pa.array(chosen, type=pa.int64()))


def with_captions(pairs: pa.Table, captions: pa.Table) -> pa.Table:
    """The pairs table with `ref_caption` and `tgt_caption` joined in, in pair order."""
    caps = captions.select(["image_id", "caption"])
    out = pairs.append_column("_row", pa.array(np.arange(pairs.num_rows)))
    out = out.join(caps.rename_columns(["ref_id", "ref_caption"]), keys="ref_id", join_type="left outer")
    out = out.join(caps.rename_columns(["tgt_id", "tgt_caption"]), keys="tgt_id", join_type="left outer")
    out = out.sort_by("_row").drop_columns(["_row"])
    return out.select(["pair_id", "ref_id", "tgt_id", "similarity", "ref_caption", "tgt_caption"])
