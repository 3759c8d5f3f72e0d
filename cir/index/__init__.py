"""Sharded FAISS indexes: build, load, search and merge (`jobs/index.py` builds them,
`serve/` serves them; neither re-implements any of it).

An index is a folder (DESIGN.md): per shard one FAISS file and one ids file, and a
`manifest.json` naming the encoder, dim, metric, index type and parameters, rows per
shard and the sha256 of every file. It is written under a temporary name and renamed
into place (`build.write_index`); loading checks the checksums and that the serving
encoder is the one the gallery was encoded with (`build.load_shard`). A search over
shards returns exactly the top-k that one index over all rows would, ties broken by id
(`search.merge_topk`).
"""
