"""The encode stage's `map_batches` callable: image bytes or paths -> embeddings.

Rows whose image cannot be read (missing file, corrupt or non-image bytes) come out
with a null embedding and the reason in `error`, so the stage can count and report
them by name instead of failing the whole run.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from cir.encoders import ClipEncoder, decode_image


def encoded_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("image_id", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
        pa.field("error", pa.string()),
    ])


def _load(row_image, row_path) -> bytes:
    if row_image is not None:
        return row_image
    if row_path is None:
        raise ValueError("row has neither image bytes nor a path")
    try:
        with open(row_path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {row_path}: {exc.strerror or exc}") from exc


class ImageEmbedder:
    """Holds one encoder per actor; the model loads once, in the constructor."""

    def __init__(self, model: str, threads: int = 0, precision: str = "fp32",
                 device: str | None = None):
        threads = threads or max(1, os.cpu_count() or 1)
        self.encoder = ClipEncoder(model, device=device, threads=threads, precision=precision)
        self.schema = encoded_schema(self.encoder.dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        images = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * n
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * n
        decoded, ok_rows, errors = [], [], [None] * n
        for i, (data, path) in enumerate(zip(images, paths)):
            try:
                decoded.append(decode_image(_load(data, path)))
                ok_rows.append(i)
            except ValueError as exc:
                errors[i] = str(exc)
        dim = self.encoder.dim
        vectors = np.zeros((n, dim), np.float32)
        if decoded:
            vectors[ok_rows] = self.encoder.encode_images(decoded)
        valid = np.zeros(n, bool)
        valid[ok_rows] = True
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim,
                                                      mask=pa.array(~valid))
        return pa.table({"image_id": batch.column("image_id"), "embedding": embedding,
                         "error": pa.array(errors, pa.string())}, schema=self.schema)
