"""Arrow schemas of the tables that pass between jobs (see DESIGN.md, "Data contracts").

Every table is a folder of Parquet shards. Readers check the columns they need with
`require_columns` so that a wrong file fails with a message naming the missing column,
not with a KeyError deep inside a Ray task.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

CORPUS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),  # encoded PNG/JPEG bytes; or `path` instead
        pa.field("caption", pa.string()),
        pa.field("category", pa.string()),
    ]
)

# A corpus may hold file paths instead of image bytes (an image folder, or a Parquet
# corpus written by another tool).
CORPUS_BY_PATH = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("category", pa.string()),
    ]
)

PAIRS = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("ref_id", pa.string(), nullable=False),
        pa.field("tgt_id", pa.string(), nullable=False),
        pa.field("similarity", pa.float32()),
    ]
)

TRIPLETS = pa.schema(
    [
        pa.field("triplet_id", pa.string(), nullable=False),
        pa.field("ref_id", pa.string(), nullable=False),
        pa.field("tgt_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("reverse_text", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("generator", pa.string(), nullable=False),
        pa.field("similarity", pa.float32()),
    ]
)

# Schema-metadata keys of the embeddings table.
META_MODEL = b"cir.model"
META_DIM = b"cir.dim"


def embeddings_schema(dim: int, model: str) -> pa.Schema:
    """Schema of the embeddings table: L2-normalised float32 vectors of width `dim`."""
    if dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            # "element" is the child name Parquet gives list items on read.
            pa.field("embedding", pa.list_(pa.field("element", pa.float32()), dim)),
        ],
        metadata={META_MODEL: model.encode(), META_DIM: str(dim).encode()},
    )


def embeddings_metadata(schema: pa.Schema) -> tuple[str, int]:
    """(model name, dim) recorded in an embeddings table's schema."""
    meta = schema.metadata or {}
    if META_MODEL not in meta or META_DIM not in meta:
        raise ValueError(
            "embeddings table has no model/dim metadata "
            f"(expected schema metadata keys {META_MODEL!r} and {META_DIM!r})"
        )
    return meta[META_MODEL].decode(), int(meta[META_DIM])


def embedding_array(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """[n, d] float32 rows as a fixed_size_list<float32>[d] column; rows where `valid`
    is False are null (an image that could not be read)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1], mask=mask)


def embedding_matrix(column) -> np.ndarray:
    """[n, d] float32 from a fixed_size_list column (Array or ChunkedArray, no nulls)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError(f"embedding column has {arr.null_count} null rows")
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(len(arr), arr.type.list_size), dtype=np.float32)


def require_columns(schema: pa.Schema, columns, what: str) -> None:
    """Raise ValueError naming every column of `columns` that `schema` lacks."""
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(
            f"{what} is missing column(s) {', '.join(missing)}; it has {', '.join(schema.names)}"
        )
