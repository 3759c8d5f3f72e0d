"""The gallery store that the index job writes beside the index (its `gallery` stage):
per image its id, caption, category, a JPEG thumbnail for result pages, and the
reference copy that an `image_id` query encodes.

The ids and metadata are held in memory (tens of bytes per image); thumbnails and
reference copies stay on disk and are read one Parquet row group at a time, the last
few groups cached, so a replica's memory does not grow with the gallery's images.
"""
from __future__ import annotations

from pathlib import Path

from cir.data.lookup import KeyedParquet
from cir.outputs import parquet_files

METADATA = ("image_id", "caption", "category")


class GalleryStore:
    def __init__(self, folder: str | Path, cached_groups: int = 32):
        self.folder = Path(folder)
        files = parquet_files(self.folder)
        if not files:
            raise FileNotFoundError(f"{self.folder} holds no gallery table; run jobs/index.py")
        try:
            self._table = KeyedParquet(files, "image_id", keep=METADATA[1:], cached_groups=cached_groups)
        except ValueError:
            raise ValueError(f"{self.folder}: gallery ids are not unique") from None
        self.ids = self._table.keys
        self.captions, self.categories = self._table.kept["caption"], self._table.kept["category"]
        self.has_references = "reference" in self._table.columns

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._table

    def metadata(self, image_id: str) -> dict:
        i = self._table.row(image_id)
        return {"image_id": image_id, "caption": self.captions[i], "category": self.categories[i]}

    def page(self, offset: int, limit: int) -> list[dict]:
        return [self.metadata(i) for i in self.ids[offset:offset + limit]]

    def thumbnail(self, image_id: str) -> bytes | None:
        return self._table.value(image_id, "thumbnail")

    def reference(self, image_id: str) -> bytes | None:
        """The encoded image that stands for `image_id` in a query (None: not stored)."""
        return self._table.value(image_id, "reference") if self.has_references else None
