"""Speed and memory, as ratios against a baseline run in the same process.

    python jobs/bench.py                       # everything below, default sizes
    python jobs/bench.py encode --models cir-tiny ViT-B-32 --images 512
    python jobs/bench.py mine --sizes 1000 10000 100000

encode: the synth job's Ray Data encode stage (read_parquet -> map_batches over an
        actor pool -> write_parquet) against a plain in-process loop over the same
        images, model, batch size and torch threads. Ratio = Ray img/s / loop img/s.
mine:   FAISS self-kNN time vs corpus size, and the approximate index's recall@k
        against exact search (on a sample of queries) where it is used.
train:  samples/s of the Ray Train + DeepSpeed loop (1 and 2 workers) against a plain
        single-process loop on the same composer, examples and micro-batch; peak RSS
        per worker.
Results are printed and written as JSON to --output (default outputs/bench).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def bench_encode(model: str, n_images: int, batch_size: int, threads: int) -> dict:
    import ray
    import torch

    from cir.data.shapes_corpus import write_corpus
    from cir.encoders import ClipEncoder, decode_image
    from cir.outputs import read_table
    from cir.synth.encode import ImageEmbedder

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", n_images, seed=123, image_size=224)
        table = read_table(corpus, columns=["image_id", "image"])

        # Baseline: a plain loop in this process (model load excluded, decode included).
        torch.set_num_threads(threads)
        encoder = ClipEncoder(model, threads=threads)
        images = table.column("image").to_pylist()
        encoder.encode_images([decode_image(images[0])])  # warm-up
        t0 = time.perf_counter()
        for start in range(0, n_images, batch_size):
            encoder.encode_images([decode_image(b) for b in images[start:start + batch_size]])
        loop_s = time.perf_counter() - t0
        del encoder

        # The synth stage: start-up of the actor (model load) included, as a user sees it.
        t0 = time.perf_counter()
        ds = ray.data.read_parquet(str(corpus)).select_columns(["image_id", "image"]).map_batches(
            ImageEmbedder, fn_constructor_kwargs={"model": model, "threads": threads},
            batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        ds.write_parquet(str(Path(tmp) / "emb"))
        ray_s = time.perf_counter() - t0
        rows = sum(1 for _ in (Path(tmp) / "emb").glob("*.parquet"))
    result = {
        "model": model, "images": n_images, "batch_size": batch_size, "threads": threads,
        "loop_img_per_s": n_images / loop_s, "ray_img_per_s": n_images / ray_s,
        "ratio_ray_over_loop": loop_s / ray_s, "ray_files": rows,
    }
    print(f"encode {model}: loop {result['loop_img_per_s']:.1f} img/s, Ray Data "
          f"{result['ray_img_per_s']:.1f} img/s, ratio {result['ratio_ray_over_loop']:.2f}", flush=True)
    return result


def clustered_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in families around random centres, like embeddings of a real
    collection (uniform random vectors have no neighbours worth finding)."""
    rng = np.random.default_rng(seed)
    n_centres = max(1, n // 20)
    centres = rng.normal(size=(n_centres, d)).astype(np.float32)
    v = centres[rng.integers(n_centres, size=n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def bench_mine(n: int, d: int, k: int, exact_limit: int, nprobe: int, sample: int = 1000) -> dict:
    from cir.mining import knn

    v = clustered_vectors(n, d)
    t0 = time.perf_counter()
    _, idx = knn(v, k, exact_limit=exact_limit, nprobe=nprobe)
    seconds = time.perf_counter() - t0
    result = {"vectors": n, "dim": d, "k": k, "index": "exact" if n <= exact_limit else "ivf",
              "seconds": seconds}
    if n > exact_limit:
        rng = np.random.default_rng(1)
        queries = rng.choice(n, size=min(sample, n), replace=False)
        sims = v[queries] @ v.T
        sims[np.arange(len(queries)), queries] = -np.inf
        exact = np.argpartition(-sims, k, axis=1)[:, :k]
        hits = [len(set(exact[i]) & set(idx[q])) for i, q in enumerate(queries)]
        result["recall_at_k_vs_exact"] = float(np.mean(hits) / k)
        result["nprobe"] = nprobe
    print(f"mine {n} x {d}, k={k}: {seconds:.1f}s ({result['index']})"
          + (f", recall@{k} vs exact {result['recall_at_k_vs_exact']:.3f}" if "recall_at_k_vs_exact" in result else ""),
          flush=True)
    return result


def plain_train_loop(cfg, examples, steps: int) -> dict:
    """The baseline: one process, torch AdamW, no Ray, no DeepSpeed."""
    import resource

    import torch

    from cir.losses import LossConfig
    from cir.models.composer import ComposerConfig, build_composer
    from cir.train.loop import _batch

    stage = cfg.stages[0]
    torch.manual_seed(0)
    model = build_composer(ComposerConfig.from_dict(cfg.model), LossConfig(**stage.loss))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.optim.lr)
    micro = stage.optim.micro_batch_size
    rows = examples.to_pydict()
    batches = [{k: v[i:i + micro] for k, v in rows.items()} for i in range(0, examples.num_rows - micro + 1, micro)]
    model.train()
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # the first step (allocations, lazy init) is warm-up
        out = model(_batch(batches[step % len(batches)]))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"samples_per_s": steps * micro / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_train(config: str, steps: int, storage: str, threads: int) -> dict:
    from dataclasses import asdict

    from cir.config import load_config
    from cir.train.config import TrainConfig
    from cir.train.run import build_examples, run_training

    base = load_config(TrainConfig, config)
    stage = base.stages[0]
    examples = build_examples(stage.data, base.model.get("vision", "cir-tiny"))
    import torch

    # Each Ray Train worker runs cores / workers threads; the plain loop gets `threads`.
    torch.set_num_threads(threads)
    plain = plain_train_loop(base, examples, steps)
    result = {"config": config, "micro_batch_size": stage.optim.micro_batch_size,
              "plain_threads": threads, "plain": plain}
    timed_stage = asdict(stage)
    for workers in (1, 2):
        name = f"bench-{workers}w-{time.strftime('%H%M%S')}"
        cfg = load_config(TrainConfig, config, [
            ("run.name", name), ("run.storage", storage), ("run.num_workers", workers),
            ("run.eval_every", 0), ("run.checkpoint_every", 10**9), ("run.report_every", max(1, steps // 2)),
            ("stages", [{**timed_stage, "optim": {**timed_stage["optim"], "max_steps": steps + max(1, steps // 2)}}])])
        run_training(cfg)
        history = json.loads((Path(storage) / name / stage.name / "history.json").read_text())
        timed = [h for h in history if "samples_per_s" in h][1:]  # the first window holds start-up
        rate = float(np.mean([h["samples_per_s"] for h in timed]))
        result[f"ray_{workers}w"] = {"samples_per_s": rate, "ratio_vs_plain": rate / plain["samples_per_s"],
                                     "peak_rss_mb_per_worker": max(h["peak_rss_mb"] for h in history if "peak_rss_mb" in h)}
        print(f"train {workers} worker(s): {rate:.1f} samples/s = {rate / plain['samples_per_s']:.2f}x plain "
              f"({plain['samples_per_s']:.1f}/s)", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", default=["encode", "mine", "train"], choices=["encode", "mine", "train"])
    p.add_argument("--models", nargs="+", default=["cir-tiny", "ViT-B-32"])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sizes", nargs="+", type=int, default=[1000, 10_000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exact-limit", type=int, default=50_000)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--train-config", default="configs/train/shapes_A.yaml")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--train-threads", type=int, default=1,
                   help="torch threads of the plain loop (a Ray worker on 2 cores with 2 workers runs 1)")
    p.add_argument("--output", default="outputs/bench")
    args = p.parse_args(argv)

    results = {}
    if "encode" in args.what:
        from cir.raycluster import init_ray

        init_ray()
        results["encode"] = [bench_encode(m, args.images, args.batch_size, args.threads) for m in args.models]
    if "train" in args.what:
        from cir.raycluster import init_ray

        init_ray()
        results["train"] = bench_train(args.train_config, args.train_steps, str(Path(args.output).resolve() / "runs"),
                                       args.train_threads)
    if "mine" in args.what:
        results["mine"] = [bench_mine(n, args.dim, args.k, args.exact_limit, args.nprobe) for n in args.sizes]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
