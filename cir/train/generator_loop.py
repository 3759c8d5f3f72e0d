"""The text generator's stage on Ray Train: the worker loop (the composer's `run_steps`
around the generator's LM loss), validation, and the driver that chains stages.

Layout and resuming are the composer job's (`cir.train.run`): one folder per stage
under `run.storage`/`run.name`/ with Ray Train's checkpoints, `export/` (safetensors +
JSON: what the `mtst` and `captions` synth steps load), `history.json` and `curve.png`;
a stage whose export exists is skipped, and a rerun resumes from the latest checkpoint.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from cir.config import from_dict
from cir.progress import log
from cir.storage import Where

CURVE_METRICS = ("val_exact",)


class TextLoss(torch.nn.Module):
    """What the Engine steps: the generator's LM loss on a batch of one task."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, batch: dict) -> dict:
        return self.generator(batch["task"], batch["pixels"], batch["texts"], batch.get("prompts"))


def _column(rows: dict, name: str, n: int) -> list:
    return list(rows[name]) if name in rows else [None] * n


def training_batch(generator, task: str, rows: dict) -> dict:
    """The generator's batch from a numpy batch of example rows (bytes or paths)."""
    from cir.embed import read_image

    n = len(rows["text"])
    sides = ("a", "b") if task == "modification" else ("a",)
    pixels = [generator.pixels([read_image(d, p) for d, p in zip(_column(rows, f"{s}_image", n),
                                                                 _column(rows, f"{s}_path", n))])
              for s in sides]
    return {"task": task, "pixels": pixels, "texts": [str(t) for t in rows["text"]],
            "prompts": [p if isinstance(p, str) else None for p in _column(rows, "prompt", n)]}


@torch.no_grad()
def evaluate_generator(generator, val: dict, batch_size: int = 64) -> dict:
    """Validation loss (teacher-forced on the reference texts, per token) and the share
    of generated texts that the exact checker accepts (percent)."""
    from cir.data.edit_parse import is_exact

    task, prompt = val["task"], val.get("prompt")
    was_training = generator.training
    generator.eval()
    loss_sum, tokens, texts = 0.0, 0, []
    for i in range(0, len(val["texts"]), batch_size):
        images = [val["a"][i:i + batch_size]] + ([val["b"][i:i + batch_size]] if val["b"] else [])
        pixels = [generator.pixels(side) for side in images]
        chunk = val["texts"][i:i + batch_size]
        out = generator(task, pixels, chunk, [prompt] * len(chunk))
        loss_sum, tokens = loss_sum + float(out["loss"]) * out["tokens"], tokens + out["tokens"]
        texts += generator.generate(task, pixels, prompt=prompt)
    generator.train(was_training)
    b = val["b_captions"] or [None] * len(texts)
    exact = [is_exact(task, t, a, c) for t, a, c in zip(texts, val["a_captions"], b)]
    return {"val_loss": loss_sum / max(tokens, 1), "val_exact": 100.0 * float(np.mean(exact))}


def tokenizer_from_json(text: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from cir.models.generator import BOS, EOS, PAD

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS)


def generator_loop_per_worker(config: dict) -> None:
    import ray

    from cir.models.config import GeneratorConfig
    from cir.models.generator import Generator, export_generator
    from cir.train.config import DeepSpeedConfig, RunSettings
    from cir.train.engine import Engine
    from cir.train.generator_config import GeneratorStageConfig
    from cir.train.loop import run_steps, worker_setup

    stage = from_dict(GeneratorStageConfig, config["stage"], "stage")
    run = from_dict(RunSettings, config["run"], "run")
    rank, world, device = worker_setup(run, stage.data.seed)
    tokenizer = tokenizer_from_json(config["tokenizer"]) if config.get("tokenizer") else None
    generator = Generator(from_dict(GeneratorConfig, config["model"], "model"), tokenizer=tokenizer)
    if config.get("init_from"):
        from safetensors.torch import load_model

        from cir.train.run import init_weights

        load_model(generator, init_weights(config["init_from"]), strict=True)
    engine = Engine(TextLoss(generator).to(device), stage, from_dict(DeepSpeedConfig, config["deepspeed"], "deepspeed"),
                    world, config["total_steps"], device)
    val = ray.get(config["val"]) if config.get("val") is not None else None

    def evaluate():  # rank 0 only: the other ranks' numbers would be the same
        return evaluate_generator(engine.module.generator, val) if rank == 0 else {}

    run_steps(engine, config, stage, run, rank, world,
              lambda rows: training_batch(engine.module.generator, stage.task, rows), evaluate,
              lambda folder: export_generator(engine.module.generator, folder, extra={"task": stage.task}))


# ---------------------------------------------------------------------- the driver

def fit_tokenizer(cfg) -> str | None:
    """The builtin LM's BPE (as JSON), fitted once on the texts of every stage, so that
    chained stages share one vocabulary; None for a pretrained LM (its own tokenizer)."""
    from cir.models.generator import BUILTIN_LM, train_tokenizer
    from cir.train.generator_data import tokenizer_texts

    if cfg.model.lm != BUILTIN_LM:
        return None
    texts = tokenizer_texts(cfg.stages, cfg.run.storage)
    tokenizer = train_tokenizer(texts, cfg.model.vocab_size)
    log(f"tokenizer: byte-level BPE of {len(tokenizer)} tokens fitted on {len(texts)} texts")
    return tokenizer.backend_tokenizer.to_str()


def stage_examples(stage, workers: int, storage: str):
    """(Ray Dataset, number of examples) of a stage."""
    from cir.raycluster import dataset_from_table
    from cir.train.generator_data import caption_examples, modification_examples, synth_examples

    if stage.task == "caption":
        return caption_examples(stage.data, storage)
    if stage.data.synth_dir:
        dataset, n = synth_examples(stage.data, workers)
    else:
        table = modification_examples(stage.data)
        n_blocks = max(workers * 4, table.num_rows // 2048)
        dataset, n = dataset_from_table(table, -(-table.num_rows // n_blocks)), table.num_rows
    if stage.data.rehearse:
        # shuffled once, so that every stretch of an epoch mixes the two
        rehearsed, m = synth_examples(stage.data.rehearsal(), workers)
        dataset, n = dataset.union(rehearsed).random_shuffle(seed=stage.data.seed).materialize(), n + m
    return dataset, n


def run_generator_training(cfg) -> Where:
    """All stages in order, each from the previous stage's export; returns the last."""
    import ray

    from cir.train.generator_data import shapes_val
    from cir.train.run import claim_stage, fit_stage, run_folder, stage_settings

    tokenizer = fit_tokenizer(cfg)
    digest = hashlib.sha1(tokenizer.encode()).hexdigest() if tokenizer else None
    init_from = None
    for stage in cfg.stages:
        stage_dir = run_folder(cfg) / stage.name
        claim_stage(stage_dir, {**stage_settings(cfg, stage, init_from), "tokenizer_sha1": digest})
        if (stage_dir / "export" / "config.json").is_file():
            log(f"stage {stage.name}: already exported at {stage_dir / 'export'}, skipping")
            init_from = stage_dir / "export"
            continue
        dataset, n = stage_examples(stage, cfg.run.num_workers, cfg.run.storage)
        val = None
        if cfg.run.eval_every and (stage.task == "caption" or stage.data.benchmark == "shapes"):
            val = shapes_val(stage.task, stage.data.benchmark_dir, cfg.run.eval_split, cfg.run.eval_limit)
            val = ray.put({**val, "prompt": stage.data.prompt})   # what the stage's examples are trained after
        init_from = fit_stage(cfg, stage, init_from, dataset, n, val, generator_loop_per_worker, CURVE_METRICS,
                              extra={"tokenizer": tokenizer})
    return init_from
