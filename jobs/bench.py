"""Speed and memory, as ratios against a baseline run in the same process.

    python jobs/bench.py                       # everything below, default sizes
    python jobs/bench.py encode --models cir-tiny ViT-B-32 --images 512
    python jobs/bench.py mine --sizes 1000 10000 100000
    python jobs/bench.py generate              # hf + SmolLM2 on 200 shapes pairs

encode: the embedding stage as the synth job runs it (read_parquet -> actor pool ->
        write_parquet) against its callable in a plain in-process loop over the same
        images, model, batch size and torch threads. Ratio = Ray img/s / loop img/s.
mine:   FAISS self-kNN time vs corpus size, and the approximate index's recall@k
        against exact search (on a sample of queries) where it is used.
generate: rows/s and generated tokens/s of the `hf` backend's batched actor (Ray Data,
        left-padded batches) against the same model answering one prompt at a time in
        this process, on shapes caption pairs (default: SmolLM2, 200 pairs).
mtst:   pairs/s of the `mtst` backend's batched actor (Ray Data, forward and reverse
        texts) against the same generator writing one pair at a time in this process, on
        a synth output's mined pairs (needs --mtst-model, a jobs/train_generator.py export).
index:  the index the index job picks for --index-size clustered vectors within
        --memory-budget-mb (0: none): build time, estimated and serialised size,
        recall@10 against exact search and query speed against flat, on held-out queries.
serve:  p50/p99 latency and throughput of the search app's POST /search (serve/) on
        --serve-vectors gallery vectors in 2 shards, at concurrency 1 and 8 over loopback,
        against the same encoder + FAISS search called in this process.
load:   --load-seconds of searches at concurrency 16: every status and each replica's
        memory growth after a warm-up.
direction: the quality filter's direction score on a synth output's texts, for their own
        pair and for another pair's (is the encoder's text tower informative?).
train:  samples/s of the Ray Train + DeepSpeed loop (1 and 2 workers) against a plain
        single-process loop on the same composer, examples and micro-batch; peak RSS
        per worker.
Results are printed and written as JSON to --output (default outputs/bench). The
measurements live in cir/bench.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCHES = ("encode", "mine", "train", "generate", "mtst", "direction", "index", "serve", "load")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # (no argparse choices: with nargs="*" they reject the empty default)
    p.add_argument("what", nargs="*", help=f"any of {', '.join(BENCHES)} (default: all)")
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
    p.add_argument("--llm", default="smollm2", help="generate: the hf backend's model")
    p.add_argument("--pairs", type=int, default=200, help="generate: caption pairs for the batched actor")
    p.add_argument("--llm-batch-size", type=int, default=64)
    p.add_argument("--baseline-prompts", type=int, default=24,
                   help="generate: prompts the one-at-a-time baseline answers (its rate, not its total, counts)")
    p.add_argument("--mtst-model", default="outputs/runs/shapes-generator/modification/export",
                   help="mtst: the generator export")
    p.add_argument("--mtst-pairs", type=int, default=500, help="mtst: mined pairs for the batched actor")
    p.add_argument("--mtst-baseline-pairs", type=int, default=50, help="mtst: pairs written one at a time")
    p.add_argument("--index-size", type=int, default=1_000_000, help="index: gallery vectors")
    p.add_argument("--memory-budget-mb", type=float, default=0,
                   help="index: MiB the shard's index may take (0: no limit; a tight one picks IVF-PQ)")
    p.add_argument("--serve-vectors", type=int, default=100_000, help="serve/load: gallery vectors")
    p.add_argument("--serve-requests", type=int, default=200, help="serve: requests at concurrency 1 (x4 at 8)")
    p.add_argument("--serve-encoder", default="cir-shapes", help="serve/load: the open_clip tower of baseline:sum")
    p.add_argument("--load-seconds", type=float, default=60, help="load: seconds of load")
    p.add_argument("--synth-output", default="outputs/synth-local", help="direction, mtst: a synth output folder")
    p.add_argument("--output", default="outputs/bench")
    args = p.parse_args(argv)
    args.what = args.what or list(BENCHES)
    unknown = sorted(set(args.what) - set(BENCHES))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    from cir.bench import bench_encode, bench_mine, bench_train
    from cir.outputs import write_json_atomic

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
    if "generate" in args.what:
        from cir.bench import bench_generate
        from cir.raycluster import init_ray

        init_ray()
        results["generate"] = bench_generate(args.llm, args.pairs, args.llm_batch_size, args.baseline_prompts,
                                             args.threads)
    if "mtst" in args.what:
        from cir.bench import bench_mtst
        from cir.raycluster import init_ray

        init_ray()
        results["mtst"] = bench_mtst(args.mtst_model, args.synth_output, args.mtst_pairs, args.llm_batch_size,
                                     args.mtst_baseline_pairs, args.threads)
    if "index" in args.what:
        from cir.bench import bench_index

        results["index"] = bench_index(args.index_size, args.dim, args.memory_budget_mb)
    if "serve" in args.what or "load" in args.what:
        from cir.raycluster import init_ray
        from cir.serving.bench import bench_load, bench_serve

        init_ray()
        if "serve" in args.what:
            results["serve"] = bench_serve(args.serve_vectors, args.serve_requests, encoder=args.serve_encoder)
        if "load" in args.what:
            results["load"] = bench_load(args.serve_vectors, args.load_seconds, encoder=args.serve_encoder)
    if "direction" in args.what:
        from cir.bench import bench_direction

        results["direction"] = bench_direction(args.synth_output)
    if "mine" in args.what:
        results["mine"] = [bench_mine(n, args.dim, args.k, args.exact_limit, args.nprobe) for n in args.sizes]
    path = write_json_atomic(Path(args.output) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json", results,
                             sort_keys=False)
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
