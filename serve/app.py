"""The retrieval app: a composed-query encoder, one deployment per index shard, and a
FastAPI ingress that encodes a query, fans it out to the shards and merges their top-k
(`cir.index.search`: exactly what one index over all rows returns, ties by id).

    serve run serve/config.yaml          # the index of `python jobs/index.py`, on 127.0.0.1:8000
    serve build serve.app:app -o x.yaml  # `app` is the Application with default settings

`build_app(ServeSettings)` is the builder that `serve/config.yaml` names; Serve checks
its `args:` against `ServeSettings`. (No `from __future__ import annotations` here:
Serve reads that annotation as a class.)
"""
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve import Application

from serve.ingress import SearchIngress
from serve.settings import ServeSettings


@serve.deployment
class QueryEncoder:
    """Turns (reference image, text) into a query vector, batching concurrent requests."""

    def __init__(self, settings: dict):
        from cir.index.build import check_encoder, read_manifest
        from cir.query_encoders import load_query_encoder, serving_model

        s = ServeSettings.model_validate(settings)
        manifest = read_manifest(s.folders()[0])
        self.spec, tower = serving_model(manifest, s.model, s.encoder)     # refused before loading it
        self.model = load_query_encoder(self.spec, tower, device=s.device, threads=s.threads)
        check_encoder(manifest, self.spec, self.model.dim, tower)
        self.encode.set_max_batch_size(s.batching.max_batch_size)
        self.encode.set_batch_wait_timeout_s(s.batching.batch_wait_timeout_s)

    def check_health(self):
        """Serve's health check (every `health_check_period_s`): the model encodes a 1-row
        query to a finite vector of its width, or the replica is replaced."""
        from PIL import Image

        m = self.model
        image = Image.new("RGB", (32, 32), "white") if m.uses_images else None
        vector = np.asarray(m.encode_queries([image], ["health check" if m.uses_texts else None]))
        if vector.shape != (1, m.dim) or not np.isfinite(vector).all():
            raise RuntimeError(f"the query encoder answered a {vector.shape} probe, not a finite (1, {m.dim}) vector")

    def describe(self) -> dict:
        m = self.model
        return {"name": m.name, "spec": self.spec, "encoder": m.encoder, "dim": m.dim,
                "uses_images": m.uses_images, "uses_texts": m.uses_texts}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode(self, queries: list) -> list:
        """Each query is (RGB image or None, text or None). Answers a float32 vector, or
        the encoder's error message for a query it cannot take (e.g. no text for a model
        that needs one); queries of one form are encoded together."""
        out: list = [None] * len(queries)
        forms: dict = {}
        for i, (image, text) in enumerate(queries):
            forms.setdefault((image is None, text is None), []).append(i)
        for rows in forms.values():
            try:
                vectors = self.model.encode_queries([queries[i][0] for i in rows], [queries[i][1] for i in rows])
            except ValueError as exc:
                vectors = [str(exc)] * len(rows)
            for i, v in zip(rows, vectors):
                out[i] = v
        return out


@serve.deployment
class IndexShard:
    """One shard of the index, memory-mapped, answering top-k with ties."""

    def __init__(self, settings: dict, shard: int):
        from cir.index.build import load_shard, read_manifest
        from cir.index.search import ShardSearcher

        import faiss

        s = ServeSettings.model_validate(settings)
        # FAISS's OpenMP threads spin while they wait: more than the replica's CPUs slows
        # every replica on the node.
        faiss.omp_set_num_threads(s.threads)
        index_dir = s.folders()[0]
        manifest = read_manifest(index_dir)
        if shard >= len(manifest["shards"]):
            raise ValueError(f"{index_dir} has {len(manifest['shards'])} shards, no shard {shard}")
        self.shard, self.entry = shard, manifest["shards"][shard]
        self.searcher = ShardSearcher(*load_shard(index_dir, shard, manifest))
        self.probe = np.full((1, self.searcher.index.d), self.searcher.index.d ** -0.5, np.float32)

    def check_health(self):
        """Serve's health check (every `health_check_period_s`): the mapped shard answers a
        1-row search with a finite score, or the replica is replaced."""
        if not self.entry["rows"]:
            return
        scores, ids = self.searcher.search(self.probe, 1)[0]
        if not (len(ids) and np.isfinite(scores).all()):
            raise RuntimeError(f"index shard {self.shard} answered a 1-row search with {len(ids)} rows, "
                               f"scores {scores[:3]}")

    def describe(self) -> dict:
        return {"shard": self.shard, "rows": self.entry["rows"], "factory": self.entry["factory"],
                "search": self.entry["search"]}

    def search(self, query: np.ndarray, k: int, with_vectors: bool = False) -> tuple:
        return self.searcher.search(query[None], k, with_vectors)[0]


def build_app(args: ServeSettings) -> Application:
    """The deployment graph. Nothing is read here (the index may live on storage only the
    cluster sees): each replica checks the index when it starts."""
    # Relative to where the app is built (the repository root under `serve run`).
    settings = args.model_copy(update={"index": str(Path(args.index).expanduser().resolve())})
    plain = settings.model_dump()
    encoder = QueryEncoder.options(**settings.query_encoder.options("QueryEncoder")).bind(plain)
    shards = [IndexShard.options(**settings.shard.options(f"IndexShard{i:03d}")).bind(plain, i)
              for i in range(settings.shards)]
    return SearchIngress.options(**settings.ingress.options("SearchIngress")).bind(encoder, shards, plain)


app = build_app(ServeSettings())
