"""The text generator's training examples and validation sets.

Every example is one row: `a_image` / `a_path` (the reference, or the captioned image),
`b_image` / `b_path` (the target; null for captions) and `text`. Images travel as
encoded bytes or as paths that the training workers read, never as pixels.

* modification: the annotated triplets of a benchmark split (shapes, CIRR, FashionIQ
  through `cir.benchmarks`): (reference, target) -> text, and with `reverse` also
  (target, reference) -> the reverse text where the annotation has one (shapes).
  Or the triplets of a synth job's output folder (`synth_dir`): the images are read
  by id from its corpus in a Ray Data actor pool, never on the driver.
* caption: a captioned Parquet corpus, read by Ray Data on the workers' side.
"""
from __future__ import annotations

import pyarrow as pa

from cir.progress import log

# `prompt`: what the example is trained after (null: the model's prompt for the task),
# so that one model keeps two wordings apart, e.g. exhaustive caption-based texts and
# the benchmark's annotated style
EXAMPLE_SCHEMA = pa.schema([("a_image", pa.binary()), ("a_path", pa.string()), ("b_image", pa.binary()),
                            ("b_path", pa.string()), ("text", pa.string()), ("prompt", pa.string())])
TOKENIZER_SAMPLE = 200_000   # texts the builtin LM's BPE is fitted on, at most


def _image_ref(bench, image_id: str) -> tuple[bytes | None, str | None]:
    if bench.image_source is not None:
        return bench.image_bytes(image_id), None
    return None, str(bench.image_path(image_id))


def modification_examples(data) -> pa.Table:
    """(reference, target, text) rows, and (target, reference, reverse text) ones."""
    from cir.train.run import load_train_benchmarks

    rows, missing, n = [], {}, 0
    for bench in load_train_benchmarks(data.as_benchmark_data()):
        queries = [q for q in bench.queries if q.target_ids][: data.limit or None]
        for q in queries:
            n += 1
            try:
                ref, tgt = _image_ref(bench, q.ref_id), _image_ref(bench, q.target_ids[0])
            except FileNotFoundError as exc:
                missing[q.query_id] = str(exc)
                continue
            rows.append((*ref, *tgt, q.text, data.prompt))
            reverse = q.meta.get("reverse_text")
            if data.reverse and reverse:
                rows.append((*tgt, *ref, reverse, data.prompt))
    if missing:
        first = "; ".join(list(missing.values())[:3])
        if not rows:
            raise FileNotFoundError(f"no image of {n} queries could be found ({first}); check data.images")
        log(f"WARNING: {len(missing)} of {n} queries left out, their images are missing (first: {first})")
    if not rows:
        raise ValueError(f"no annotated triplets with a target in {data.benchmark} {data.split}")
    return pa.Table.from_pylist([dict(zip(EXAMPLE_SCHEMA.names, r)) for r in rows], schema=EXAMPLE_SCHEMA)


def synth_corpus_files(root, corpus: str | None = None) -> list[str]:
    """The corpus files of a synth output folder: the table its later stages read
    (captions/, else corpus/), or `corpus` when set (a run whose corpus was a Parquet
    source has no copy of its own)."""
    from cir.data import corpus as corpus_io
    from cir.outputs import SUCCESS, parquet_files
    from cir.storage import refs, resolve

    if corpus:
        return corpus_io.parquet_corpus_files(corpus)
    root = resolve(root)
    found = [root / s for s in ("captions", "corpus") if (root / s / SUCCESS).is_file()]
    if not found:
        raise FileNotFoundError(f"{root} has no corpus table of its own (its corpus was a Parquet source): "
                                "name that source as the corpus")
    return refs(parquet_files(found[0]))


def synth_tables(data) -> tuple[list[str], list[str]]:
    """(triplet files, corpus files) of the synth output folder `data.synth_dir` (a
    local folder or a URI: paths or `cir.storage` locations)."""
    from cir.outputs import SUCCESS, parquet_files
    from cir.storage import refs, resolve

    root = resolve(data.synth_dir)
    if not (root / "triplets" / SUCCESS).is_file():
        raise FileNotFoundError(f"{root / 'triplets'} is not a finished synth table; run jobs/synth.py first")
    return refs(parquet_files(root / "triplets")), synth_corpus_files(root, data.corpus)


class PairImages:
    """`map_batches` callable: triplet rows (ids, texts) -> example rows with the two
    images' bytes or paths, read by id from the corpus; the reverse texts as rows of
    their own."""

    def __init__(self, corpus_files: list[str], reverse: bool, prompt: str | None = None):
        from cir.data.lookup import KeyedParquet

        self.corpus, self.reverse, self.prompt = KeyedParquet(corpus_files, "image_id"), reverse, prompt

    def _image(self, image_id: str) -> tuple:
        return self.corpus.value(image_id, "image"), self.corpus.value(image_id, "path")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for ref_id, tgt_id, text, reverse in zip(*(batch.column(c).to_pylist() for c in
                                                   ("ref_id", "tgt_id", "text", "reverse_text"))):
            ref, tgt = self._image(ref_id), self._image(tgt_id)
            rows.append((*ref, *tgt, text, self.prompt))
            if self.reverse and reverse:
                rows.append((*tgt, *ref, reverse, self.prompt))
        return pa.Table.from_pylist([dict(zip(EXAMPLE_SCHEMA.names, r)) for r in rows], schema=EXAMPLE_SCHEMA)


def synth_examples(data, workers: int):
    """(Ray Dataset of example rows, number of rows) of a synth output's triplets."""
    import ray

    from cir.storage import ray_read_parquet

    triplets, corpus = synth_tables(data)
    ds = ray_read_parquet(triplets).select_columns(["ref_id", "tgt_id", "text", "reverse_text"])
    ds = ds.limit(data.limit) if data.limit else ds
    ds = ds.map_batches(PairImages, fn_constructor_args=(corpus, data.reverse, data.prompt), batch_format="pyarrow",
                        batch_size=256, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)))
    # Read before training starts, as caption_examples does; the count is then the
    # blocks' metadata, not another read.
    ds = ds.materialize()
    return ds, ds.count()


def corpus_files(data, storage: str) -> list:
    """The Parquet files of a caption stage's corpus; "shapes" writes the shapes corpus
    of `data.shapes` under `storage`/corpora/ on first use (a committed `OutputDir`
    stage, on a local disk or a bucket)."""
    from dataclasses import asdict

    from cir.data import corpus as corpus_io
    from cir.outputs import OutputDir, parquet_files
    from cir.storage import refs, resolve

    if data.corpus != "shapes":
        return corpus_io.parquet_corpus_files(data.corpus)
    s = data.shapes
    name = f"shapes-{s.n_images}-seed{s.seed}-{s.image_size}px-f{s.family_size}"
    corpora = OutputDir(resolve(storage) / "corpora")
    if not corpora.done(name):
        from cir.data.shapes_corpus import write_corpus_files

        log(f"corpus: writing {s.n_images} shapes images (seed {s.seed}) into {corpora.path(name)}")
        with corpora.stage(name, asdict(s)) as (tmp, manifest):
            write_corpus_files(tmp, s.n_images, seed=s.seed, image_size=s.image_size, family_size=s.family_size)
            manifest["rows"] = s.n_images
    return refs(parquet_files(corpora.path(name)))


def caption_examples(data, storage: str):
    """(Ray Dataset of caption rows, number of rows) of a captioned Parquet corpus."""
    import ray
    from ray.data.expressions import col

    from cir.data import corpus as corpus_io
    from cir.storage import ray_read_parquet

    files = corpus_files(data, storage)
    schema = corpus_io.check_parquet_corpus(files, needs_captions=True)
    captions = corpus_io.read_captions(files).column("caption")
    n = len(captions) - captions.null_count
    if data.limit:
        n = min(n, data.limit)
    columns = [c for c in ("image", "path") if c in schema.names] + ["caption"]
    ds = ray_read_parquet(files).select_columns(columns).filter(expr=col("caption").is_not_null())
    if data.limit:
        ds = ds.limit(data.limit)
    rename = {"image": "a_image", "path": "a_path", "caption": "text"}
    # Read before training starts: the training workers hold the CPUs that read tasks
    # would wait for (the blocks stay in the object store, spilling at scale).
    return ds.rename_columns({c: rename[c] for c in columns}).materialize(), n


def modification_texts(data) -> list[str]:
    """The texts a modification stage trains on (no image is read)."""
    from cir.train.run import load_train_benchmarks

    if data.synth_dir:
        from cir.outputs import read_table
        from cir.storage import resolve

        columns = ["text", "reverse_text"] if data.reverse else ["text"]
        table = read_table(resolve(data.synth_dir) / "triplets", columns=columns)
        table = table.slice(0, data.limit) if data.limit else table
        return [t for c in columns for t in table.column(c).to_pylist() if t]
    texts = []
    for bench in load_train_benchmarks(data.as_benchmark_data()):
        for q in [q for q in bench.queries if q.target_ids][: data.limit or None]:
            texts.append(q.text)
            if data.reverse and q.meta.get("reverse_text"):
                texts.append(q.meta["reverse_text"])
    return texts


def tokenizer_texts(stages, storage: str) -> list[str]:
    """The texts of every stage (a stable sample), that the builtin LM's BPE is fitted on."""
    from cir.data import corpus as corpus_io

    sources = [(s.task, s.data) for s in stages]
    sources += [("modification", s.data.rehearsal()) for s in stages if s.data.rehearse]
    texts: list[str] = []
    seen = set()   # a stage that rehearses an earlier stage's synth output adds no new text
    for task, data in sources:
        if task == "caption":
            files = corpus_files(data, storage)
            caps = corpus_io.read_captions(files).column("caption").drop_null().to_pylist()
            texts += caps[:TOKENIZER_SAMPLE]
        elif not data.synth_dir or data.synth_dir not in seen:
            seen.add(data.synth_dir)
            texts += modification_texts(data)
    return texts[:: max(1, len(texts) // TOKENIZER_SAMPLE)]


def shapes_val(task: str, benchmark_dir: str, split: str, limit: int) -> dict:
    """A shapes split for validation during training: encoded images, the reference
    texts (for the validation loss) and the captions the exact checker needs."""
    from cir.benchmarks import load_benchmark
    from cir.benchmarks.shapes import shapes_benchmark_root

    bench = load_benchmark("shapes", split, shapes_benchmark_root(benchmark_dir))
    caption = {i: bench.meta["captions"][i] for i in bench.gallery_ids} if "captions" in bench.meta else None
    if caption is None:
        raise ValueError(f"{bench.name} {split}: the benchmark has no captions to check texts against")
    if task == "caption":
        ids = bench.gallery_ids[:limit]
        return {"task": task, "a": [bench.image_bytes(i) for i in ids], "b": None,
                "texts": [caption[i] for i in ids], "a_captions": [caption[i] for i in ids], "b_captions": None}
    queries = bench.queries[:limit]
    return {"task": task, "a": [bench.image_bytes(q.ref_id) for q in queries],
            "b": [bench.image_bytes(q.target_ids[0]) for q in queries], "texts": [q.text for q in queries],
            "a_captions": [caption[q.ref_id] for q in queries],
            "b_captions": [caption[q.target_ids[0]] for q in queries]}
