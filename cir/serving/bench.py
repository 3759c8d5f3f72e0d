"""Latency and load of the search app (`jobs/bench.py serve` / `load`), against the same
encoder and FAISS search called in this process.

The gallery is `clustered_vectors` in the shipped `cir-shapes` space (100k x 128 by
default, in 2 shards): encoding 100k images takes minutes on 2 cores and would change
no latency. Queries are real: shapes images uploaded as PNG with a modification text,
through the app's whole path (form parsing, decoding, the encoder, both shards, merge).
"""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np

from cir.progress import log

TEXTS = ("make it red", "add a small blue circle at the top left", "remove the star", "make the square large")


def write_bench_gallery(root: Path, n: int, shards: int, encoder: str, dim: int) -> Path:
    """An index job output (index/ and gallery/ stages) over `n` synthetic vectors of
    `encoder`'s width."""
    import pyarrow as pa

    from cir.bench import clustered_vectors
    from cir.index.build import write_index
    from cir.index.job import GALLERY_SCHEMA
    from cir.outputs import OutputDir

    out = OutputDir(root)
    ids = [f"bench-{i:07d}" for i in range(n)]
    with out.stage("index", {"bench": n}) as (tmp, _):
        tmp.rmdir()      # write_index refuses an existing folder; it creates it atomically
        write_index(tmp, ids, clustered_vectors(n, dim, seed=0), encoder, shards)
    with out.stage("gallery", {"bench": n}) as (tmp, _):
        none = [None] * n
        table = pa.table({"image_id": ids, "caption": none, "category": none, "thumbnail": none,
                          "reference": none}, schema=GALLERY_SCHEMA)
        pa.parquet.write_table(table, tmp / "part-0.parquet", row_group_size=4096)
    return root


def query_uploads(n: int = 16) -> list[tuple[bytes, str]]:
    from cir.data.shapes import random_scene, render

    rng = np.random.default_rng(0)
    uploads = []
    for i in range(n):
        out = io.BytesIO()
        render(random_scene(rng), 64, seed=i).save(out, format="PNG")
        uploads.append((out.getvalue(), TEXTS[i % len(TEXTS)]))
    return uploads


def latency_summary(seconds: list[float], wall: float) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_rps": len(ms) / wall}


def in_process_model(encoder: str):
    """baseline:sum over `encoder`, with the app's default threads (1 torch, 1 FAISS)."""
    import faiss

    from cir.query_encoders import load_query_encoder

    faiss.omp_set_num_threads(1)
    return load_query_encoder("baseline:sum", encoder, threads=1)


def in_process_latency(model, index_root: Path, uploads, requests: int, k: int) -> dict:
    """The same work without Serve: decode, encode, search both shards, merge."""
    from cir.index.search import ShardedIndex
    from cir.serving.inputs import Limits, decode_upload

    index = ShardedIndex.load(index_root / "index")
    times = []
    t_start = time.perf_counter()
    for i in range(requests):
        data, text = uploads[i % len(uploads)]
        t0 = time.perf_counter()
        vector = model.encode_queries([decode_upload(data, Limits())], [text])
        index.search(vector, k)
        times.append(time.perf_counter() - t0)
    return latency_summary(times, time.perf_counter() - t_start)


def http_load(url: str, uploads, concurrency: int, requests: int | None = None, seconds: float | None = None,
              k: int = 10) -> dict:
    """`concurrency` clients posting searches back to back, for `requests` in all or for
    `seconds`; latencies of the 200s and a count of every status."""
    import httpx

    times, statuses, lock = [], {}, threading.Lock()
    deadline = time.perf_counter() + seconds if seconds else None
    counter = iter(range(10**9))

    def client():
        with httpx.Client(timeout=60) as http:
            while True:
                i = next(counter)
                if (requests is not None and i >= requests) or (deadline and time.perf_counter() > deadline):
                    return
                data, text = uploads[i % len(uploads)]
                t0 = time.perf_counter()
                try:
                    status = http.post(f"{url}/search", data={"text": text, "k": str(k)},
                                       files={"image": ("q.png", data, "image/png")}).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        times.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**latency_summary(times, time.perf_counter() - t_start), "concurrency": concurrency,
            "statuses": {str(s): c for s, c in statuses.items()}}


def replica_rss() -> dict[str, int]:
    """Resident memory of each Serve replica of the app, by actor name."""
    import psutil
    from ray.util.state import list_actors

    out = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith("ServeReplica:cir-search"):
            try:
                out[actor.class_name.split(":")[-1]] = psutil.Process(actor.pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return out


class ServedBench:
    """The search app over a bench gallery, under Serve on a free loopback port."""

    def __init__(self, root: Path, n: int, encoder: str, dim: int, shards: int = 2):
        from ray import serve

        from serve.app import build_app
        from serve.settings import ServeSettings

        self.root = write_bench_gallery(root, n, shards, encoder, dim)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeSettings(index=str(self.root), shards=shards)), name="cir-search", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        from ray import serve

        serve.shutdown()


def bench_serve(n: int = 100_000, requests: int = 200, k: int = 10, encoder: str = "cir-shapes",
                workdir: str | None = None) -> dict:
    """p50/p99 and throughput of POST /search at concurrency 1 and 8, against in-process."""
    import tempfile

    uploads = query_uploads()
    model = in_process_model(encoder)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        app = ServedBench(Path(tmp) / "gallery", n, encoder, model.dim)
        try:
            http_load(app.url, uploads, 1, requests=20, k=k)            # warm up every replica
            baseline = in_process_latency(model, app.root, uploads, requests, k)
            one = http_load(app.url, uploads, 1, requests=requests, k=k)
            eight = http_load(app.url, uploads, 8, requests=4 * requests, k=k)
        finally:
            app.close()
    result = {"encoder": f"baseline:sum@{encoder}", "gallery_vectors": n, "shards": 2, "k": k, "in_process": baseline, "serve_c1": one, "serve_c8": eight,
              "p50_ratio_c1": one["p50_ms"] / baseline["p50_ms"]}
    log(f"serve {encoder}, {n} vectors / 2 shards: in-process p50 {baseline['p50_ms']:.1f} ms; Serve c=1 p50 "
        f"{one['p50_ms']:.1f} ms p99 {one['p99_ms']:.1f} ms {one['throughput_rps']:.1f} req/s "
        f"({result['p50_ratio_c1']:.2f}x in-process); c=8 p50 {eight['p50_ms']:.1f} ms p99 {eight['p99_ms']:.1f} ms "
        f"{eight['throughput_rps']:.1f} req/s; statuses {one['statuses']} {eight['statuses']}")
    return result


def bench_load(n: int = 100_000, seconds: float = 60, concurrency: int = 8, k: int = 10,
               encoder: str = "cir-shapes", workdir: str | None = None) -> dict:
    """`seconds` of searches at `concurrency`: every status, and each replica's memory
    after a warm-up against its memory at the end."""
    import tempfile

    uploads = query_uploads()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        app = ServedBench(Path(tmp) / "gallery", n, encoder, in_process_model(encoder).dim)
        try:
            http_load(app.url, uploads, concurrency, requests=100, k=k)
            before = replica_rss()
            load = http_load(app.url, uploads, concurrency, seconds=seconds, k=k)
            after = replica_rss()
        finally:
            app.close()
    growth = {name: after[name] / before[name] - 1 for name in before if name in after}
    errors = sum(c for s, c in load["statuses"].items() if not s.isdigit() or int(s) >= 500)
    result = {"encoder": f"baseline:sum@{encoder}", "gallery_vectors": n, "seconds": seconds, **load, "server_errors": errors,
              "rss_mb_before": {n_: v / 2**20 for n_, v in before.items()},
              "rss_mb_after": {n_: v / 2**20 for n_, v in after.items()}, "rss_growth": growth,
              "max_rss_growth": max(growth.values()) if growth else None}
    log(f"load {seconds:.0f}s at concurrency {concurrency}: {load['requests']} ok, statuses {load['statuses']}, "
        f"{errors} server errors; p50 {load['p50_ms']:.1f} ms p99 {load['p99_ms']:.1f} ms; replica RSS growth "
        + ", ".join(f"{name} {100 * g:+.1f}%" for name, g in sorted(growth.items())))
    return result
