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


def upload_forms(uploads) -> list[dict]:
    """Searches by an uploaded image and a text, as `http_load` takes them."""
    return [{"data": {"text": text}, "files": {"image": ("q.png", data, "image/png")}} for data, text in uploads]


def mixed_forms(image_ids: list[str], upload: bytes) -> list[dict]:
    """Searches of each kind the API takes, as `http_load` takes them: a gallery image and
    a text, an upload and a text, a text alone (for a model that takes each)."""
    image = {"image": ("reference.png", upload, "image/png")}
    return [{"data": {"image_id": image_ids[0], "text": TEXTS[0]}},
            {"data": {"image_id": image_ids[len(image_ids) // 2], "text": TEXTS[1]}},
            {"data": {"text": TEXTS[2]}, "files": image},
            {"data": {"text": TEXTS[3]}}]


def http_load(url: str, forms: list[dict], concurrency: int, requests: int | None = None,
              seconds: float | None = None, k: int = 10, on_response=None) -> dict:
    """`concurrency` clients posting searches back to back, for `requests` in all or for
    `seconds`: the i-th is `forms[i % len(forms)]` (httpx.post's `data` and `files`) with
    `k`. Latencies of the 200s and a count of every status (or client exception name);
    `on_response(i, response or exception)` sees every answer, from the client threads."""
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
                form = forms[i % len(forms)]
                t0 = time.perf_counter()
                try:
                    answer = http.post(f"{url}/search", data={**form.get("data", {}), "k": str(k)},
                                       files=form.get("files"))
                    status = answer.status_code
                except httpx.HTTPError as exc:
                    answer, status = exc, type(exc).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        times.append(time.perf_counter() - t0)
                if on_response is not None:
                    on_response(i, answer)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**latency_summary(times, time.perf_counter() - t_start), "concurrency": concurrency,
            "statuses": {str(s): c for s, c in statuses.items()}}


def server_errors(statuses: dict) -> int:
    """The 5xx answers and failed requests (no HTTP answer) of an `http_load` result."""
    return sum(c for s, c in statuses.items() if not s.isdigit() or int(s) >= 500)


def serve_replicas(app: str = "cir-search") -> dict[str, list[int]]:
    """The pids of each deployment's live replicas of Serve app `app`, by deployment name,
    from Ray's state API (asked at the connected cluster: the machine may run others)."""
    import ray
    from ray.util.state import list_actors

    out: dict[str, list[int]] = {}
    prefix = f"ServeReplica:{app}:"
    for actor in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                             limit=10_000):
        if actor.class_name.startswith(prefix):
            out.setdefault(actor.class_name[len(prefix):], []).append(actor.pid)
    return out


def replica_rss(app: str = "cir-search") -> dict[str, int]:
    """Resident memory of each Serve replica of `app` (on this node), by deployment name
    (numbered when a deployment has several)."""
    import psutil

    out = {}
    for name, pids in serve_replicas(app).items():
        for n, pid in enumerate(sorted(pids)):
            try:
                out[name if len(pids) == 1 else f"{name}#{n}"] = psutil.Process(pid).memory_info().rss
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
    forms = upload_forms(uploads)
    model = in_process_model(encoder)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        app = ServedBench(Path(tmp) / "gallery", n, encoder, model.dim)
        try:
            http_load(app.url, forms, 1, requests=20, k=k)            # warm up every replica
            baseline = in_process_latency(model, app.root, uploads, requests, k)
            one = http_load(app.url, forms, 1, requests=requests, k=k)
            eight = http_load(app.url, forms, 8, requests=4 * requests, k=k)
        finally:
            app.close()
    result = {"encoder": f"baseline:sum@{encoder}", "gallery_vectors": n, "shards": 2, "k": k, "in_process": baseline, "serve_c1": one, "serve_c8": eight,
              "p50_ratio_c1": one["p50_ms"] / baseline["p50_ms"]}
    log(f"serve {encoder}, {n} vectors / 2 shards: in-process p50 {baseline['p50_ms']:.1f} ms; Serve c=1 p50 "
        f"{one['p50_ms']:.1f} ms p99 {one['p99_ms']:.1f} ms {one['throughput_rps']:.1f} req/s "
        f"({result['p50_ratio_c1']:.2f}x in-process); c=8 p50 {eight['p50_ms']:.1f} ms p99 {eight['p99_ms']:.1f} ms "
        f"{eight['throughput_rps']:.1f} req/s; statuses {one['statuses']} {eight['statuses']}")
    return result


def bench_load(n: int = 100_000, seconds: float = 60, concurrency: int = 16, k: int = 10,
               encoder: str = "cir-shapes", workdir: str | None = None) -> dict:
    """`seconds` of searches at `concurrency`: every status, and each replica's memory
    after a warm-up against its memory at the end."""
    import tempfile

    forms = upload_forms(query_uploads())
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        app = ServedBench(Path(tmp) / "gallery", n, encoder, in_process_model(encoder).dim)
        try:
            result = load_run(app.url, forms, concurrency, seconds, k, warmup=100)
        finally:
            app.close()
    return {"encoder": f"baseline:sum@{encoder}", "gallery_vectors": n, **result}


def load_run(url: str, forms: list[dict], concurrency: int, seconds: float, k: int = 10, warmup: int = 100) -> dict:
    """`warmup` searches, then `seconds` at `concurrency` against the app at `url`: every
    status, the server errors, latency, and each replica's RSS after the warm-up and at
    the end (this node's replicas of the app named cir-search)."""
    http_load(url, forms, concurrency, requests=warmup, k=k)
    before = replica_rss()
    load = http_load(url, forms, concurrency, seconds=seconds, k=k)
    after = replica_rss()
    growth = {name: after[name] / before[name] - 1 for name in before if name in after}
    errors = server_errors(load["statuses"])
    result = {"seconds": seconds, **load, "server_errors": errors,
              "rss_mb_before": {n_: v / 2**20 for n_, v in before.items()},
              "rss_mb_after": {n_: v / 2**20 for n_, v in after.items()}, "rss_growth": growth,
              "max_rss_growth": max(growth.values()) if growth else None}
    log(f"load {seconds:.0f}s at concurrency {concurrency}: {load['requests']} ok, statuses {load['statuses']}, "
        f"{errors} server errors; p50 {load['p50_ms']:.1f} ms p99 {load['p99_ms']:.1f} ms, "
        f"{load['throughput_rps']:.1f} req/s; replica RSS growth "
        + ", ".join(f"{name} {100 * g:+.1f}%" for name, g in sorted(growth.items())))
    return result
