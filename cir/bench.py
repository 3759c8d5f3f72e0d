"""Speed and memory of the jobs' Ray stages, as ratios against a plain baseline run in
the same process (the machines are shared and noisy; only ratios travel).

* `bench_encode`: the embedding stage (`cir.embed`) as the synth job runs it
  (read_parquet -> actor pool -> write_parquet) against the same `Embedder` called in a
  plain loop in this process, over the same images, model, batch size and threads.
* `bench_mine`: FAISS self-kNN time against corpus size, and the approximate index's
  recall@k against exact search on a sample of queries where it is used.
* `bench_train`: samples/s of the Ray Train + DeepSpeed loop (1 and 2 workers) against
  a plain single-process loop on the same composer, objective, examples and micro-batch;
  peak RSS per worker.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cir.progress import log


def bench_encode(model: str, n_images: int, batch_size: int, threads: int) -> dict:
    import ray
    import torch

    from cir.data.shapes_corpus import write_corpus
    from cir.embed import EmbedSettings, Embedder, embed
    from cir.outputs import read_table

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", n_images, seed=123, image_size=224)
        table = read_table(corpus, columns=["image_id", "image"])

        # Baseline: the stage's callable in a plain loop here (model load excluded).
        torch.set_num_threads(threads)
        embedder = Embedder(model, threads=threads)
        embedder(table.slice(0, 1))  # warm-up
        t0 = time.perf_counter()
        for start in range(0, n_images, batch_size):
            embedder(table.slice(start, batch_size))
        loop_s = time.perf_counter() - t0
        del embedder

        # The stage as the synth job runs it: the actor's start-up (model load) included.
        t0 = time.perf_counter()
        images = ray.data.read_parquet(str(corpus)).select_columns(["image_id", "image"])
        settings = EmbedSettings(batch_size=batch_size, num_actors=1, torch_threads=threads)
        embed(images, model, settings).write_parquet(str(Path(tmp) / "emb"))
        ray_s = time.perf_counter() - t0
    result = {"model": model, "images": n_images, "batch_size": batch_size, "threads": threads,
              "loop_img_per_s": n_images / loop_s, "ray_img_per_s": n_images / ray_s,
              "ratio_ray_over_loop": loop_s / ray_s}
    log(f"encode {model}: loop {result['loop_img_per_s']:.1f} img/s, Ray Data "
        f"{result['ray_img_per_s']:.1f} img/s, ratio {result['ratio_ray_over_loop']:.2f}")
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
    log(f"mine {n} x {d}, k={k}: {seconds:.1f}s ({result['index']})"
        + (f", recall@{k} vs exact {result['recall_at_k_vs_exact']:.3f}" if "recall_at_k_vs_exact" in result else ""))
    return result


def plain_train_loop(cfg, examples, steps: int) -> dict:
    """The baseline: one process, torch AdamW, no Ray, no DeepSpeed."""
    import resource

    import torch

    from cir.models.composer import build_composer
    from cir.train.loop import training_batch
    from cir.train.objectives import build_objective

    stage = cfg.stages[0]
    torch.manual_seed(0)
    objective = build_objective(build_composer(cfg.model), stage.loss)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=stage.optim.lr)
    micro = stage.optim.micro_batch_size
    rows = examples.to_pydict()
    batches = [{k: v[i:i + micro] for k, v in rows.items()} for i in range(0, examples.num_rows - micro + 1, micro)]
    objective.train()
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # the first step (allocations, lazy init) is warm-up
        out = objective(training_batch(batches[step % len(batches)]))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"samples_per_s": steps * micro / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_train(config: str, steps: int, storage: str, threads: int) -> dict:
    import torch

    from cir.config import load_config
    from cir.train.config import TrainConfig
    from cir.train.run import build_examples, run_training

    base = load_config(TrainConfig, config)
    stage = base.stages[0]
    examples = build_examples(stage.data, base.model.vision, Path(storage) / "features", base.embed)
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
        log(f"train {workers} worker(s): {rate:.1f} samples/s = {rate / plain['samples_per_s']:.2f}x plain "
            f"({plain['samples_per_s']:.1f}/s)")
    return result


def shapes_caption_pairs(n: int, seed: int = 0):
    """`n` (reference, target) caption pairs of the shapes world, one random edit apart:
    the pairs rows an LLM backend takes."""
    import pyarrow as pa

    from cir.data.edits import apply_edit, random_edit
    from cir.data.shapes import caption, random_scene

    rng = np.random.default_rng(seed)
    refs, tgts = [], []
    for _ in range(n):
        scene = random_scene(rng)
        refs.append(caption(scene))
        tgts.append(caption(apply_edit(scene, random_edit(rng, scene))))
    return pa.table({"pair_id": [f"bench-{i:05d}" for i in range(n)], "ref_id": [f"r{i}" for i in range(n)],
                     "tgt_id": [f"t{i}" for i in range(n)], "similarity": pa.array([0.9] * n, pa.float32()),
                     "ref_caption": refs, "tgt_caption": tgts})


def bench_generate(model: str, n_pairs: int, batch_size: int, baseline_prompts: int, threads: int) -> dict:
    """The `hf` backend's batched actor (Ray Data, left-padded batches; the actor's model
    load included) against the same model answering one prompt at a time in this process
    (model load excluded), on the modify prompt of `n_pairs` shapes pairs. The baseline
    runs the first `baseline_prompts` of them: its rate does not depend on how many."""
    import torch

    from cir.generate.hf import ChatModel, HFBackend, HFOptions
    from cir.generate.llm import TextTaskOptions

    pairs = shapes_caption_pairs(n_pairs)
    backend = HFBackend(HFOptions(model=model, torch_threads=threads), batch_size=batch_size, num_actors=1,
                        task=TextTaskOptions(reverse=False))
    task = backend.tasks()[0]
    torch.set_num_threads(threads)
    chat = ChatModel(model, threads=threads)     # converts a GGUF once, so the actor loads fast
    rows = pairs.slice(0, baseline_prompts).to_pylist()
    t0 = time.perf_counter()
    tokens = sum(chat.chat([task.messages(r["ref_caption"], r["tgt_caption"])], task.max_new_tokens)[1][0]
                 for r in rows)
    loop_s, loop_tokens = time.perf_counter() - t0, tokens
    del chat

    t0 = time.perf_counter()
    from cir.raycluster import dataset_from_table

    out = backend.generate(dataset_from_table(pairs, batch_size), task, list(pairs.column_names)).take_all()
    ray_s = time.perf_counter() - t0
    ray_tokens = sum(r[task.output + "_tokens"] for r in out)
    result = {"model": model, "pairs": n_pairs, "batch_size": batch_size, "threads": threads,
              "baseline_prompts": baseline_prompts, "max_new_tokens": task.max_new_tokens,
              "loop_rows_per_s": baseline_prompts / loop_s, "loop_tokens_per_s": loop_tokens / loop_s,
              "ray_rows_per_s": len(out) / ray_s, "ray_tokens_per_s": ray_tokens / ray_s,
              "ratio_rows": (len(out) / ray_s) / (baseline_prompts / loop_s),
              "ratio_tokens": (ray_tokens / ray_s) / (loop_tokens / loop_s)}
    log(f"generate {model}: one at a time {result['loop_rows_per_s']:.2f} rows/s "
        f"{result['loop_tokens_per_s']:.1f} tok/s; batched actor (batch {batch_size}) "
        f"{result['ray_rows_per_s']:.2f} rows/s {result['ray_tokens_per_s']:.1f} tok/s; "
        f"ratio {result['ratio_rows']:.2f}x rows, {result['ratio_tokens']:.2f}x tokens")
    return result


def bench_direction(synth_output: str, n: int = 1000, shift: int = 7) -> dict:
    """Is the quality filter's direction score informative with this encoder? Over a
    synth output's triplets: cosine between each text's embedding (the encoder's text
    tower) and its pair's target - reference image direction, against the same texts
    scored on another pair's direction (shifted by `shift` rows)."""
    from cir.embed import read_embeddings
    from cir.encoders import ClipEncoder
    from cir.generate.quality import pair_directions
    from cir.outputs import read_table
    from cir.schemas import embedding_matrix

    triplets = read_table(Path(synth_output) / "triplets").slice(0, n)
    ids, vectors, model = read_embeddings(Path(synth_output) / "embeddings")
    directions = embedding_matrix(pair_directions(triplets.column("ref_id").to_pylist(),
                                                  triplets.column("tgt_id").to_pylist(), ids, vectors))
    texts = ClipEncoder(model).encode_texts(triplets.column("text").to_pylist())
    scores = {"own_pair": (texts * directions).sum(axis=1),
              "other_pair": (texts * np.roll(directions, shift, axis=0)).sum(axis=1)}
    result = {"synth_output": synth_output, "encoder": model, "texts": len(texts),
              **{name: {f"p{q}": round(float(np.percentile(v, q)), 3) for q in (5, 50, 95)}
                 for name, v in scores.items()}}
    log(f"direction score ({model}, {len(texts)} texts): own pair {result['own_pair']}, "
        f"another pair {result['other_pair']}")
    return result


def bench_index(n: int, d: int, memory_budget_mb: float = 0, queries: int = 1000, k: int = 10) -> dict:
    """The index the index job picks for `n` clustered vectors in one shard (auto: IVF-Flat
    above 50k rows, IVF-PQ where that exceeds `memory_budget_mb`; the search parameter
    tuned to recall 0.96 on the shard's own sample): its build time, estimated and actual
    size, and on held-out queries its recall@k against exact search and its query speed
    against a flat index's."""
    import faiss

    from cir.index.build import MIB, IndexParams, build_shard, plan_index, train_index, training_sample

    vectors = clustered_vectors(n + queries, d, seed=0)
    held_out, vectors = vectors[n:], vectors[:n]
    flat = faiss.IndexFlatIP(d)
    flat.add(vectors)
    t0 = time.perf_counter()
    truth = flat.search(held_out, k)[1]
    flat_s = time.perf_counter() - t0
    params = IndexParams(memory_budget_mb=memory_budget_mb)
    plan = plan_index(params, n, d)
    t0 = time.perf_counter()
    index, search = build_shard(vectors, train_index(plan, d, training_sample(vectors, plan), params.gpu),
                                plan, params)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = index.search(held_out, k)[1]
    index_s = time.perf_counter() - t0
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, found)]))
    result = {"vectors": n, "dim": d, "queries": queries, "memory_budget_mb": memory_budget_mb,
              "factory": plan.factory, "search": search, "build_s": build_s,
              "estimated_memory_mb": plan.memory_bytes(n, d) / MIB,
              "serialized_mb": len(faiss.serialize_index(index)) / MIB, f"recall@{k}": recall,
              "flat_query_s": flat_s, "index_query_s": index_s, "speed_vs_flat": flat_s / index_s}
    budget = f"{memory_budget_mb:g} MiB" if memory_budget_mb else "none"
    log(f"index {n} x {d} (memory budget {budget}): {plan.factory} {search}, "
        f"~{result['estimated_memory_mb']:.0f} MiB ({result['serialized_mb']:.0f} serialised), built in "
        f"{build_s:.1f}s; recall@{k} {recall:.3f} at {result['speed_vs_flat']:.1f}x flat's query speed")
    return result


def bench_mtst(export: str, synth_output: str, n_pairs: int, batch_size: int, baseline_pairs: int,
               threads: int) -> dict:
    """The `mtst` backend's batched actor (Ray Data; its model load included) against the
    same generator writing one pair at a time in this process (model load excluded), on
    the first `n_pairs` mined pairs of a synth output (forward and reverse texts). The
    baseline writes the first `baseline_pairs`: its rate does not depend on how many."""
    import pyarrow as pa
    import torch

    from cir.generate.mtst import MTSTBackend, MTSTGenerator, MTSTOptions
    from cir.outputs import parquet_files, read_table
    from cir.raycluster import dataset_from_table

    out = Path(synth_output)
    pairs = read_table(out / "pairs").slice(0, n_pairs)
    pairs = pairs.append_column("ref_caption", pa.nulls(pairs.num_rows, pa.string())).append_column(
        "tgt_caption", pa.nulls(pairs.num_rows, pa.string()))
    corpus = [str(f) for f in parquet_files(out / "corpus")]
    options = MTSTOptions(model=export, torch_threads=threads)
    torch.set_num_threads(threads)
    actor = MTSTGenerator(options, corpus, "bench")
    rows = pairs.slice(0, baseline_pairs)
    t0 = time.perf_counter()
    for i in range(rows.num_rows):
        actor(rows.slice(i, 1))
    loop_s = time.perf_counter() - t0
    del actor

    backend = MTSTBackend(options, batch_size=batch_size, num_actors=1)
    backend.corpus_files, backend.gpus = corpus, 0
    t0 = time.perf_counter()
    written = backend.apply(dataset_from_table(pairs, batch_size)).take_all()
    ray_s = time.perf_counter() - t0
    result = {"export": export, "pairs": pairs.num_rows, "batch_size": batch_size, "threads": threads,
              "baseline_pairs": baseline_pairs, "loop_pairs_per_s": baseline_pairs / loop_s,
              "ray_pairs_per_s": len(written) / ray_s, "ratio": (len(written) / ray_s) / (baseline_pairs / loop_s)}
    log(f"mtst: one pair at a time {result['loop_pairs_per_s']:.2f} pairs/s; batched actor (batch {batch_size}) "
        f"{result['ray_pairs_per_s']:.2f} pairs/s; ratio {result['ratio']:.2f}x")
    return result
