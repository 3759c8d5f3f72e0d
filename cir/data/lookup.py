"""Rows of a Parquet table by key, read one row group at a time: the keys are held in
memory (tens of bytes a row), the other columns stay on disk and the last few row
groups read are cached. The served gallery (`cir.index.gallery`) and the synth
steps that need images by id (`mtst`, `captions`) read through it.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict


class KeyedParquet:
    def __init__(self, files, key: str = "image_id", keep=(), cached_groups: int = 32):
        """`files`: paths or `cir.storage` locations; `keep`: columns held in memory beside
        the key (small metadata)."""
        from cir.outputs import parquet_file

        files = list(files)
        self.files = [parquet_file(f) for f in files]
        if not self.files:
            raise FileNotFoundError("no Parquet files to read")
        self.keys: list = []
        self.kept = {c: [] for c in keep}
        self._groups_at: list[tuple[int, int]] = []      # (file, row group), in row order
        self._group_starts: list[int] = []
        for fi, pf in enumerate(self.files):
            for gi in range(pf.num_row_groups):
                group = pf.read_row_group(gi, columns=[key, *keep])
                self._groups_at.append((fi, gi))
                self._group_starts.append(len(self.keys))
                self.keys += group.column(key).to_pylist()
                for c in keep:
                    self.kept[c] += group.column(c).to_pylist()
        self._row = {k: i for i, k in enumerate(self.keys)}
        if len(self._row) != len(self.keys):
            raise ValueError(f"{files[0]} (and {len(files) - 1} more files): the {key!r} column is not unique")
        self.columns = self.files[0].schema_arrow.names
        self._cache: OrderedDict = OrderedDict()
        self._cached_groups = cached_groups

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self._row

    def row(self, key) -> int:
        """The row number of `key` (KeyError if absent)."""
        return self._row[key]

    def value(self, key, column: str):
        """The value of `column` in the row of `key` (None if the table lacks the column)."""
        if column not in self.columns:
            return None
        row = self._row[key]
        g = bisect.bisect_right(self._group_starts, row) - 1
        fi, gi = self._groups_at[g]
        cache_key = (fi, gi, column)
        if cache_key not in self._cache:
            self._cache[cache_key] = self.files[fi].read_row_group(gi, columns=[column]).column(0)
            if len(self._cache) > self._cached_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(cache_key)
        return self._cache[cache_key][row - self._group_starts[g]].as_py()
