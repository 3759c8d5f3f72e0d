"""The `mtst` backend: modification texts written from the two *images* of each mined
pair by a trained text generator (`jobs/train_generator.py`), MTST's synthetic
triplets. It writes the forward text (reference -> target) and, with `reverse`, the
reverse text (target -> reference), batched `generate` in a Ray Data actor pool (a GPU
per actor when the cluster has GPUs). Captions are not needed.

The pairs carry ids only; each actor reads the images by id from the corpus table
(`cir.data.lookup`, a row group at a time), so no image travels through the driver.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from cir.generate.base import Backend, candidate_rows, triplet_rows

GENERATOR_PREFIX = "mtst:"


@dataclass
class MTSTOptions:
    """`generate.mtst`."""

    model: str = ""                  # an export of jobs/train_generator.py (its modification stage)
    reverse: bool = True             # also write the target -> reference text
    max_new_tokens: int | None = None  # None: the export's max_text_tokens
    num_beams: int = 1               # 1: greedy
    prompt: str | None = None        # None: the export's modification_prompt; else one a stage trained with
    dtype: str = "auto"              # auto: bf16 on CUDA, fp32 on CPU
    cpus_per_actor: float = 1
    gpus_per_actor: float | str = "auto"
    torch_threads: int = 0           # 0: the actor's CPUs


def check_generator_export(path: str, task: str, where: str) -> dict:
    """The export's config, refusing a missing export or one trained for another task."""
    from cir.models.generator import read_generator_config

    if not path:
        raise ValueError(f"{where} is required: the export folder of jobs/train_generator.py "
                         "(e.g. outputs/runs/shapes-generator/modification/export)")
    meta = read_generator_config(path)
    trained = meta.get("extra", {}).get("task")
    if trained is not None and trained != task:
        raise ValueError(f"{where}: {path} was trained for the {trained!r} task, not {task!r}")
    return meta


def pick_dtype(setting: str, device: str) -> str | None:
    if setting == "auto":
        return "bfloat16" if device.startswith("cuda") else None
    return {"fp32": None, "float32": None}.get(setting, setting)


class TextGeneratorActor:
    """What the mtst and captions actors share: the export loaded once, images by id."""

    def __init__(self, model: str, corpus_files: list[str] | None, dtype: str = "auto", threads: int = 0):
        import torch

        from cir.data.lookup import KeyedParquet
        from cir.encoders import pick_device
        from cir.models.generator import load_generator

        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(None)
        self.generator = load_generator(model, self.device, pick_dtype(dtype, self.device))
        self.corpus = KeyedParquet(corpus_files, "image_id") if corpus_files else None

    def images(self, ids) -> list:
        from cir.embed import read_image

        return [read_image(self.corpus.value(i, "image"), self.corpus.value(i, "path")) for i in ids]


class MTSTGenerator(TextGeneratorActor):
    """`map_batches` callable: a forward (and reverse) text per pair from its images."""

    def __init__(self, options: MTSTOptions, corpus_files: list[str], generator_id: str):
        super().__init__(options.model, corpus_files, options.dtype, options.torch_threads)
        self.options, self.generator_id = options, generator_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        g, o = self.generator, self.options
        ref = g.pixels(self.images(batch.column("ref_id").to_pylist()))
        tgt = g.pixels(self.images(batch.column("tgt_id").to_pylist()))
        forward = g.generate("modification", [ref, tgt], o.max_new_tokens, o.num_beams, o.prompt)
        reverse = (g.generate("modification", [tgt, ref], o.max_new_tokens, o.num_beams, o.prompt) if o.reverse
                   else [None] * len(forward))
        keep = list(range(batch.num_rows))
        rows = triplet_rows(batch, keep, forward, reverse, MTSTBackend.source, [self.generator_id] * len(keep))
        return candidate_rows(rows, batch, keep)


class MTSTBackend(Backend):
    name = "mtst"
    source = "mtst"
    needs_captions = False
    needs_corpus = True

    def validate(self) -> None:
        o = self.options
        if (o.max_new_tokens is not None and o.max_new_tokens < 1) or o.num_beams < 1:
            raise ValueError(f"generate.mtst: max_new_tokens (null or >= 1) and num_beams (>= 1), "
                             f"got {o.max_new_tokens} and {o.num_beams}")
        check_generator_export(o.model, "modification", "generate.mtst.model")

    def check_cluster(self) -> None:
        from cir.raycluster import gpus_per_actor

        self.gpus = gpus_per_actor(self.options.gpus_per_actor)

    def fingerprint(self) -> dict:
        from cir.outputs import file_sha256

        from cir.storage import resolve

        weights = resolve(self.options.model) / "model.safetensors"
        return {**super().fingerprint(), "weights_sha256": file_sha256(weights)}

    def generator_id(self) -> str:
        from cir.storage import resolve

        stage = resolve(self.options.model).parent        # <run>/<stage>/export
        return f"{GENERATOR_PREFIX}{stage.parent.name}/{stage.name}"

    def apply(self, pairs):
        from cir.actor_pool import actor_pool

        gpus = getattr(self, "gpus", 0)
        return pairs.map_batches(
            MTSTGenerator, fn_constructor_args=(self.options, self.corpus_files, self.generator_id()),
            batch_size=self.batch_size, batch_format="pyarrow",
            **actor_pool(self.num_actors, num_cpus=self.options.cpus_per_actor, **({"num_gpus": gpus} if gpus else {})))
