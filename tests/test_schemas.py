import numpy as np
import pyarrow as pa
import pytest

from cir import schemas
from cir.outputs import OutputDir, read_table, write_table


def _rows(schema: pa.Schema, n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    cols = {}
    for f in schema:
        if f.type == pa.string():
            cols[f.name] = [f"{f.name}-{i}" for i in range(n)]
        elif f.type == pa.binary():
            cols[f.name] = [bytes(rng.integers(0, 255, 8, dtype=np.uint8)) for _ in range(n)]
        elif f.type == pa.float32():
            cols[f.name] = rng.random(n).astype(np.float32)
        else:
            d = f.type.list_size
            cols[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * d).astype(np.float32)), d)
    return pa.table(cols, schema=schema)


@pytest.mark.parametrize("schema", [schemas.CORPUS, schemas.CORPUS_BY_PATH, schemas.PAIRS,
                                    schemas.TRIPLETS, schemas.embeddings_schema(16, "cir-tiny")])
def test_tables_round_trip_through_parquet_shards(tmp_path, schema):
    table = _rows(schema, 25)
    write_table(table, tmp_path / "t", rows_per_file=10)
    assert len(list((tmp_path / "t").glob("*.parquet"))) == 3
    back = read_table(tmp_path / "t")
    assert back.schema.equals(schema, check_metadata=True)
    assert back.equals(table)


def test_embeddings_metadata_names_model_and_dim():
    s = schemas.embeddings_schema(512, "ViT-B-32/openai")
    assert schemas.embeddings_metadata(s) == ("ViT-B-32/openai", 512)
    with pytest.raises(ValueError, match="metadata"):
        schemas.embeddings_metadata(schemas.PAIRS)


def test_require_columns_names_what_is_missing():
    with pytest.raises(ValueError, match="caption"):
        schemas.require_columns(schemas.PAIRS, ["pair_id", "caption"], "pairs")


def test_stage_commit_is_atomic(tmp_path):
    out = OutputDir(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with out.stage("pairs", {"k": 1}) as (tmp, manifest):
            write_table(_rows(schemas.PAIRS, 3), tmp)
            raise RuntimeError("crash mid-stage")
    assert not out.path("pairs").exists()
    assert [p.name for p in out.root.iterdir()] == []
    with out.stage("pairs", {"k": 1}) as (tmp, manifest):
        write_table(_rows(schemas.PAIRS, 3), tmp)
        manifest["rows"] = 3
    assert out.done("pairs") and out.manifest("pairs")["rows"] == 3
    out.check_fingerprint("pairs", {"k": 1})
    with pytest.raises(RuntimeError, match="other settings"):
        out.check_fingerprint("pairs", {"k": 2})
