"""The gallery store that the index job writes beside the index (its `gallery` stage):
per image its id, caption, category, a JPEG thumbnail for result pages, and the
reference copy that an `image_id` query encodes.

The ids and metadata are held in memory (tens of bytes per image); thumbnails and
reference copies stay on disk and are read one Parquet row group at a time, the last
few groups cached, so a replica's memory does not grow with the gallery's images.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path

import pyarrow.parquet as pq

from cir.outputs import parquet_files

METADATA = ("image_id", "caption", "category")


class GalleryStore:
    def __init__(self, folder: str | Path, cached_groups: int = 32):
        self.folder = Path(folder)
        self.files = [pq.ParquetFile(f) for f in parquet_files(self.folder)]
        if not self.files:
            raise FileNotFoundError(f"{self.folder} holds no gallery table; run jobs/index.py")
        self.ids, self.captions, self.categories = [], [], []
        self._groups_at: list[tuple[int, int, int]] = []     # (first row, file, row group), in row order
        for fi, pf in enumerate(self.files):
            for gi in range(pf.num_row_groups):
                group = pf.read_row_group(gi, columns=list(METADATA))
                self._groups_at.append((len(self.ids), fi, gi))
                self.ids += group.column("image_id").to_pylist()
                self.captions += group.column("caption").to_pylist()
                self.categories += group.column("category").to_pylist()
        self._group_starts = [start for start, _, _ in self._groups_at]
        self._row = {image_id: i for i, image_id in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError(f"{self.folder}: gallery ids are not unique")
        self.has_references = "reference" in self.files[0].schema_arrow.names
        self._groups: OrderedDict = OrderedDict()
        self._cached_groups = cached_groups

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row

    def metadata(self, image_id: str) -> dict:
        i = self._row[image_id]
        return {"image_id": image_id, "caption": self.captions[i], "category": self.categories[i]}

    def page(self, offset: int, limit: int) -> list[dict]:
        return [self.metadata(i) for i in self.ids[offset:offset + limit]]

    def thumbnail(self, image_id: str) -> bytes | None:
        return self._blob(image_id, "thumbnail")

    def reference(self, image_id: str) -> bytes | None:
        """The encoded image that stands for `image_id` in a query (None: not stored)."""
        return self._blob(image_id, "reference") if self.has_references else None

    def _blob(self, image_id: str, column: str) -> bytes | None:
        row = self._row[image_id]
        start, fi, gi = self._groups_at[bisect.bisect_right(self._group_starts, row) - 1]
        r = row - start
        key = (fi, gi, column)
        if key not in self._groups:
            self._groups[key] = self.files[fi].read_row_group(gi, columns=[column]).column(0)
            if len(self._groups) > self._cached_groups:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key][r].as_py()
