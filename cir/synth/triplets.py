"""The synth job's triplets stage: texts generated for the mined pairs, filtered, written.

Generation is the expensive part (an LLM, the MTST generator), so its rows are kept as
they come: each output block is one Parquet file under a store beside the stage
(`<output>/_generated/<digest of the stage's settings>/`), outside the stage's
temporary folder. A run that crashes or is killed mid-stage leaves those files, and the
rerun generates only the pairs that no readable file holds (by reference and target
id: a pair the backend wrote no row for is generated again); the triplets, the rejected
rows and the counts are then read back from the store, and the store is deleted once
the stage is committed. The folders are local paths or `cir.storage` locations.
"""
from __future__ import annotations

import pyarrow as pa

from cir import schemas
from cir.outputs import parquet_file
from cir.progress import log
from cir.storage import ray_read_parquet, refs, remove_tree, resolve, split, walk_files

BATCHES_PER_BLOCK = 16     # what a crash or a retried task can cost, in batches


def generate_triplets(backend, quality_filter: dict | None, pairs: pa.Table, folder, rejected,
                      generate, rows_per_file: int, store) -> dict | None:
    """Run `backend` over `pairs` (resuming from `store`) and write the triplets into `folder`.

    With a quality filter (the QualityFilter's arguments), the kept rows, the dropped ones
    (with `drop_reason` and `direction_score`, into `rejected`) and the counts are read
    back from the generated rows. Returns {"candidates", "kept", "dropped": {reason:
    count}, "kept_without_reverse_text"}, or None without a filter (then only empty
    texts are dropped)."""
    from ray.data.expressions import col

    from cir.outputs import atomic_path

    remove_tree(rejected)    # a previous run's, for other triplets
    rows = generate_candidates(backend, quality_filter, pairs, store, generate)
    write = {"schema": schemas.TRIPLETS, "min_rows_per_file": min(rows_per_file, 10_000)}
    fs, path = split(folder)
    if quality_filter is None:
        rows.filter(expr=col("text") != "").select_columns(list(schemas.TRIPLETS.names)).write_parquet(
            path, filesystem=fs, **write)
        return None
    counts = rows.select_columns(["drop_reason"]).groupby("drop_reason").count()
    by_reason = {row["drop_reason"]: row["count()"] for row in counts.take_all()}
    kept = rows.filter(expr=col("drop_reason") == "")
    kept.select_columns(list(schemas.TRIPLETS.names)).write_parquet(path, filesystem=fs, **write)
    without_reverse = kept.filter(expr=col("reverse_text").is_null()).count()
    if any(n for reason, n in by_reason.items() if reason):
        internal = [c for c in ("direction", "repeats") if c in rows.schema().names]
        with atomic_path(rejected, directory=True) as tmp:
            tmp_fs, tmp_path = split(tmp)
            rows.filter(expr=col("drop_reason") != "").drop_columns(internal).write_parquet(
                tmp_path, filesystem=tmp_fs)
    return {"candidates": sum(by_reason.values()), "kept": by_reason.get("", 0),
            "dropped": {reason: n for reason, n in sorted(by_reason.items()) if reason},
            "kept_without_reverse_text": without_reverse}


def generate_candidates(backend, quality_filter: dict | None, pairs: pa.Table, store, generate):
    """A Ray Dataset of the generated rows of every pair (with the filter's verdicts when
    it is on), all of them in `store`: the pairs no readable file there holds are
    generated, each output block written there as one file as it comes."""
    import pyarrow.compute as pc

    from cir.actor_pool import actor_pool
    from cir.generate.quality import QualityFilter
    from cir.raycluster import dataset_from_table

    store = resolve(store)
    store.mkdir(parents=True, exist_ok=True)
    files, done = stored_rows(store)
    keys = pair_keys(pairs)
    todo = pairs.filter(pc.invert(pc.is_in(keys, value_set=pa.array(sorted(done), pa.string()))))
    if done:
        log(f"generate: {pairs.num_rows - todo.num_rows} of {pairs.num_rows} pairs' texts kept from an "
            f"interrupted run ({store}); generating the other {todo.num_rows}")
    if todo.num_rows:
        # Blocks of a few batches: progress, and what a retry or a crash costs, stay small
        # however many pairs there are (Ray Data also stops a dataset whose blocks outlast
        # its 30-min no-progress timeout, as a slow CPU generator's would).
        n_blocks = max(8 * generate.num_actors, -(-todo.num_rows // (BATCHES_PER_BLOCK * generate.batch_size)))
        n_blocks = max(1, min(todo.num_rows // generate.batch_size, n_blocks))
        rows = backend.apply(dataset_from_table(todo, -(-todo.num_rows // n_blocks)))
        if quality_filter is not None:
            rows = rows.map_batches(QualityFilter, fn_constructor_kwargs=quality_filter,
                                    batch_size=generate.batch_size, batch_format="pyarrow", **actor_pool(1))
        fs, path = split(store)
        # No CPU asked: the generator and filter actors may hold every CPU, and a write
        # that waited for one would keep every row in memory until the last pair.
        rows.write_parquet(path, filesystem=fs, ray_remote_args={"num_cpus": 0})
        files, done = stored_rows(store)
    return ray_read_parquet(refs(files))


def pair_keys(table: pa.Table) -> pa.Array:
    """What identifies a pair in its generated rows (which carry no pair id)."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(table.column("ref_id"), table.column("tgt_id"), "\x1f")


def stored_rows(store) -> tuple[list, set]:
    """(files, pair keys) of the generated rows in `store`. A file that cannot be read (cut
    short by a crash) is deleted; a file whose pairs an earlier one holds (a retried
    task's second write) is left out."""
    files, seen = [], set()
    for f in walk_files(store):
        if not f.name.endswith(".parquet"):
            continue
        try:
            ids = set(pair_keys(parquet_file(f).read(columns=["ref_id", "tgt_id"])).to_pylist())
        except (OSError, pa.ArrowInvalid):
            log(f"generate: deleting {f}, which a crash cut short")
            f.unlink(missing_ok=True)
            continue
        if ids & seen:
            if not ids <= seen:
                raise RuntimeError(f"{f} holds some pairs of other files in {store} and some of none: "
                                   "delete that folder to generate its texts anew")
            continue
        seen |= ids
        files.append(f)
    return files, seen

