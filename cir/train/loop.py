"""The Ray Train worker loop of one training stage (`run_steps`, which the text
generator's loop shares) and the composer's stage around it.

Every worker: builds the composer (from the previous stage's export when chained) and
the stage's objective around it (`cir.train.objectives`), wraps that in an `Engine`
(DeepSpeed or DDP), restores the latest checkpoint if the
run has one, then steps through its shard of the examples. Steps are counted in
optimizer steps; a resumed run skips the micro-batches of the epoch it had already
consumed and restores each rank's random state (dropout), so no step is lost or
repeated and the steps after a restore are those of an undisturbed run. Each rank
keeps its data order, (step, CRC-32 of the rows the step consumed), in every
checkpoint: the driver installs it as `data_order.json`. Metrics go to
`ray.train.report` every `report_every` steps, checkpoints every `checkpoint_every`
steps, and the last report carries the exported model (safetensors + JSON) as its
checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from cir.config import from_dict
from cir.train.config import DeepSpeedConfig, RunSettings, StageConfig


def _features(column) -> torch.Tensor:
    """[B, d] from a numpy batch's fixed_size_list column (an object array of rows)."""
    return torch.from_numpy(np.stack(column).astype(np.float32))


def training_batch(rows: dict) -> dict:
    """An objective's batch from a numpy batch of training examples."""
    reverse = rows.get("reverse_text")
    return {
        "ref_feats": _features(rows["ref_feat"]),
        "tgt_feats": _features(rows["tgt_feat"]),
        "texts": [str(t) for t in rows["text"]],
        "reverse_texts": None if reverse is None else [None if t is None else str(t) for t in reverse],
    }


@torch.no_grad()
def evaluate_recall(composer, val: dict, ks=(1, 5, 10), batch_size: int = 128) -> dict:
    """Recall@k of the retrieval queries against the split's gallery (reference
    excluded), and the mean cosine of each query with its target (which moves with
    every weight, where recall moves in steps)."""
    from cir.metrics import embedding_recall

    was_training = composer.training
    composer.eval()
    gallery = torch.cat([composer.encode_target(torch.tensor(val["gallery"][i:i + batch_size]))
                         for i in range(0, len(val["gallery"]), batch_size)]).numpy()
    queries = torch.cat([composer.encode_query(torch.tensor(val["ref_feats"][i:i + batch_size]),
                                               val["texts"][i:i + batch_size])
                         for i in range(0, len(val["texts"]), batch_size)]).numpy()
    composer.train(was_training)
    recall = embedding_recall(queries, gallery, val["tgt_index"], ks, exclude=val["ref_index"])
    target_cos = float(np.mean(np.sum(queries * gallery[val["tgt_index"]], axis=1)))
    return {**{f"val_recall@{k}": r for k, r in recall.items()}, "val_target_cos": target_cos}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_setup(run: RunSettings, seed: int):
    """(rank, world, device) of this Ray Train worker, its threads and seeds set."""
    import ray.train

    ctx = ray.train.get_context()
    torch.set_num_threads(run.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    _seed_everything(seed)
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def train_loop_per_worker(config: dict) -> None:
    """The composer's stage: its objective in an Engine, stepped by `run_steps`."""
    import ray

    from cir.models.composer import build_composer
    from cir.models.config import ComposerConfig
    from cir.models.export import export_composer
    from cir.train.engine import Engine
    from cir.train.objectives import build_objective

    stage = from_dict(StageConfig, config["stage"], "stage")
    run = from_dict(RunSettings, config["run"], "run")
    rank, world, device = worker_setup(run, stage.data.seed)
    composer = build_composer(from_dict(ComposerConfig, config["model"], "model"))
    if config.get("init_from"):
        from safetensors.torch import load_model

        from cir.train.run import init_weights

        load_model(composer, init_weights(config["init_from"]), strict=True)
    engine = Engine(build_objective(composer, stage.loss).to(device), stage,
                    from_dict(DeepSpeedConfig, config["deepspeed"], "deepspeed"), world, config["total_steps"], device)
    val = ray.get(config["val"]) if config.get("val") is not None else None

    def evaluate():
        return evaluate_recall(engine.module.composer, val)

    run_steps(engine, config, stage, run, rank, world, training_batch, evaluate,
              lambda folder: export_composer(engine.module.composer, out_dir=folder))


def run_steps(engine, config: dict, stage, run: RunSettings, rank: int, world: int, to_batch, evaluate,
              export) -> None:
    """Step `engine` through this worker's shard of the "train" dataset to
    `config["total_steps"]`, resuming from the run's latest checkpoint: metrics every
    `report_every` steps (plus `evaluate()`'s every `eval_every`), checkpoints every
    `checkpoint_every`, and a last checkpoint holding `export(folder)`'s model. Every
    checkpoint holds the steps the run was restored from (`restored_from`) and each
    rank's data order (`save_rank_state`)."""
    import ray.train
    from ray.train import Checkpoint

    total_steps, steps_per_epoch = config["total_steps"], config["steps_per_epoch"]
    start_step, history, order, restored_from = 0, [], [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = engine.load(Path(folder))
            order = load_rank_state(Path(folder), rank)
        start_step, history = state["step"], state.get("history", [])
        restored_from = state.get("restored_from", []) + [start_step]
    evaluating = config.get("val") is not None

    def save(folder: Path, state: dict) -> None:
        engine.save(folder, {**state, "history": history, "restored_from": restored_from}, rank)
        save_rank_state(folder, rank, order)

    shard = ray.train.get_dataset_shard("train")
    accum, micro = stage.optim.grad_accum, stage.optim.micro_batch_size
    step, losses, digest, t_window = start_step, [], 0, time.perf_counter()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        batches = shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=8 * micro,
                                     local_shuffle_seed=stage.data.seed + epoch)
        for i, rows in enumerate(batches):
            if i >= steps_per_epoch * accum:
                break  # equal step counts on every rank, whatever the shard sizes
            if i < done_in_epoch * accum:
                continue  # consumed before the checkpoint we resumed from
            out = engine.train_micro_batch(to_batch(rows))
            losses.append(float(out["loss"].detach()))
            digest = batch_digest(rows, digest)
            if (i + 1) % accum:
                continue
            step += 1
            order.append([step, digest])
            digest = 0
            if run.fail_at_step is not None and step == run.fail_at_step and start_step == 0:
                raise RuntimeError(f"fail_at_step={step}: simulated worker failure")
            final = step == total_steps
            metrics = None
            if step % run.report_every == 0 or final:
                seconds = time.perf_counter() - t_window
                metrics = {"step": step, "epoch": epoch, "loss": float(np.mean(losses)), "lr": engine.lr(),
                           "samples_per_s": len(losses) * micro * world / max(seconds, 1e-9),
                           "peak_rss_mb": _peak_rss_mb()}
                losses, t_window = [], time.perf_counter()
            if evaluating and (step % run.eval_every == 0 or final):
                metrics = {**(metrics or {"step": step}), **evaluate()}
            if metrics:
                history.append(metrics)
            if final:
                _report_final(engine, metrics, history, rank, export, save)
                return
            if step % run.checkpoint_every == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save(Path(tmp), {"step": step})
                    ray.train.report(metrics or {"step": step}, checkpoint=Checkpoint.from_directory(tmp))
            elif metrics:
                ray.train.report(metrics)
            if step >= total_steps:
                break


def _report_final(engine, metrics, history, rank, export, save) -> None:
    """The last checkpoint: training state (so a re-run is a no-op) + the export."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save(folder, {"step": metrics["step"], "final": True})
        with _gathered(engine):
            if rank == 0:
                export(folder / "export")
                (folder / "history.json").write_text(json.dumps(history, indent=2))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _gathered(engine):
    """Full parameters on every rank for export (ZeRO-3 partitions them)."""
    import contextlib

    if engine.deepspeed and engine.engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def batch_digest(rows: dict, crc: int = 0) -> int:
    """CRC-32 of a numpy batch's values, column by column, continuing `crc`: which rows
    a step consumed, in which order, whatever the columns."""
    for name in sorted(rows):
        column = rows[name]
        if column.dtype != object:
            crc = zlib.crc32(np.ascontiguousarray(column).tobytes(), crc)
            continue
        for value in column:
            if value is None:
                value = b"\0"
            elif isinstance(value, str):
                value = value.encode()
            elif not isinstance(value, bytes):
                value = np.ascontiguousarray(value).tobytes()
            crc = zlib.crc32(value, crc)
    return crc


def save_rank_state(folder: Path, rank: int, order: list) -> None:
    """What only this rank knows, beside the engine's checkpoint (Ray Train merges every
    rank's folder into one): its data order so far, and its random state, from which
    dropout draws (restarting it from the seed would make the resumed steps differ)."""
    from safetensors.torch import save_file

    random_state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        random_state["cuda"] = torch.cuda.get_rng_state()
    save_file(random_state, str(folder / f"rng.{rank}.safetensors"))
    (folder / f"data_order.{rank}.json").write_text(json.dumps(order))


def load_rank_state(folder: Path, rank: int) -> list:
    """Restore this rank's random state; its data order up to the checkpoint (empty
    for a checkpoint written before ranks kept them: it resumes from the seed's state)."""
    from safetensors.torch import load_file

    if not (folder / f"rng.{rank}.safetensors").is_file():
        return []
    random_state = load_file(str(folder / f"rng.{rank}.safetensors"))
    torch.set_rng_state(random_state["cpu"])
    if "cuda" in random_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(random_state["cuda"])
    return json.loads((folder / f"data_order.{rank}.json").read_text())
