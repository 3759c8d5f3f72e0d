"""The synth job's `captions` step: fill the missing captions of a corpus (or all of
them, with `overwrite`) before anything reads them, for corpora that come without
(CoLLM's MLLM step). The captioner is

* `generator`: a captioner trained by `jobs/train_generator.py` (a `caption` stage);
* `hf`: any Hugging Face image-to-text model (`AutoModelForImageTextToText` with its
  processor: captioning models such as BLIP or GIT, or chat VLMs, which get `prompt`);
* `vllm`: a VLM served by vLLM inside Ray Data (`ray.data.llm`, the processor's
  multimodal stage), on GPU nodes: images go in as data URLs of their own bytes.

Captions pass the quality filter's text checks (`filter.min_words` / `max_words`); one
that fails stays null. The step writes a full corpus table, which the later stages read
instead of the source corpus.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pyarrow as pa

from cir.generate.vllm import VLLMOptions

CAPTIONERS = ("none", "generator", "hf", "vllm")


@dataclass
class CaptionsConfig:
    captioner: str = "none"          # none | generator | hf | vllm
    model: str = ""                  # generator: an export; hf: a model id or folder (vllm: vllm.model_source)
    overwrite: bool = False          # True: caption every image, not only those without one
    prompt: str = "Describe this image in one short sentence."   # chat VLMs (hf) and vllm
    max_new_tokens: int = 48
    batch_size: int = 64
    num_actors: int = 1
    dtype: str = "auto"              # auto: bf16 on CUDA, fp32 on CPU
    cpus_per_actor: float = 1
    gpus_per_actor: float | str = "auto"
    torch_threads: int = 0
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    @property
    def active(self) -> bool:
        return self.captioner != "none"

    def validate(self) -> None:
        if self.captioner not in CAPTIONERS:
            raise ValueError(f"captions.captioner must be one of {', '.join(CAPTIONERS)}, got {self.captioner!r}")
        if self.batch_size < 1 or self.num_actors < 1 or self.max_new_tokens < 1:
            raise ValueError("captions: batch_size, num_actors and max_new_tokens must be >= 1")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"captions.dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.captioner == "generator":
            from cir.generate.mtst import check_generator_export

            check_generator_export(self.model, "caption", "captions.model")
        elif self.captioner == "hf":
            from cir.generate.hf import check_model_source

            if not self.model.strip():
                raise ValueError("captions.model is required for captioner 'hf': an image-to-text model id or folder")
            check_model_source(self.model, "captions.model")
        elif self.captioner == "vllm":
            vllm_backend(self).validate_engine()

    def fingerprint(self) -> dict:
        fp = {"captioner": self.captioner, "model": self.model, "overwrite": self.overwrite,
              "prompt": self.prompt, "max_new_tokens": self.max_new_tokens}
        if self.captioner == "generator":
            from cir.outputs import file_sha256
            from cir.storage import resolve

            fp["weights_sha256"] = file_sha256(resolve(self.model) / "model.safetensors")
        if self.captioner == "vllm":
            fp["vllm"] = {"model_source": self.vllm.model_source, "engine_kwargs": self.vllm.engine_kwargs}
        return fp


def vllm_backend(cfg: CaptionsConfig):
    """The vllm backend's engine settings and cluster checks, for the captioner."""
    from cir.generate.vllm import VLLMBackend

    return VLLMBackend(cfg.vllm, batch_size=cfg.batch_size, num_actors=cfg.num_actors)


def _needs(batch: pa.Table, overwrite: bool) -> list[int]:
    caps = batch.column("caption").to_pylist()
    return [i for i, c in enumerate(caps) if overwrite or not c or not c.strip()]


def _fill(batch: pa.Table, rows: list[int], texts: list[str], filter_cfg) -> pa.Table:
    """The batch with `texts` as the captions of `rows`; a text the filter refuses: null."""
    from cir.generate.quality import KEPT, text_reason

    caps = batch.column("caption").to_pylist()
    for i, text in zip(rows, texts):
        text = (text or "").strip()
        caps[i] = text if text_reason(text, "", "", filter_cfg) == KEPT else None
    return batch.set_column(batch.column_names.index("caption"), "caption", pa.array(caps, pa.string()))


def _images(batch: pa.Table, rows: list[int]) -> list:
    from cir.embed import read_image

    data = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * batch.num_rows
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * batch.num_rows
    return [read_image(data[i], paths[i]) for i in rows]


class GeneratorCaptioner:
    """`map_batches` callable: captions from a trained captioner export."""

    def __init__(self, cfg: CaptionsConfig, filter_cfg):
        from cir.generate.mtst import TextGeneratorActor

        self.actor = TextGeneratorActor(cfg.model, None, cfg.dtype, cfg.torch_threads)
        self.cfg, self.filter_cfg = cfg, filter_cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _needs(batch, self.cfg.overwrite)
        if not rows:
            return batch
        g = self.actor.generator
        texts = g.generate("caption", [g.pixels(_images(batch, rows))], self.cfg.max_new_tokens)
        return _fill(batch, rows, texts, self.filter_cfg)


class HFCaptioner:
    """`map_batches` callable: captions from a Hugging Face image-to-text model."""

    def __init__(self, cfg: CaptionsConfig, filter_cfg):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from cir.encoders import pick_device
        from cir.generate.mtst import pick_dtype
        from cir.models.llm import _dtype

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = pick_device(None)
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        self.model = AutoModelForImageTextToText.from_pretrained(
            cfg.model, dtype=_dtype(pick_dtype(cfg.dtype, self.device))).to(self.device).eval()
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.cfg, self.filter_cfg = cfg, filter_cfg

    def captions(self, images) -> list[str]:
        import torch

        p = self.processor
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.cfg.prompt}]}]
            prompt = p.apply_chat_template(messages, add_generation_prompt=True)
            inputs = p(text=[prompt] * len(images), images=[[im] for im in images], return_tensors="pt",
                       padding=True)
        else:
            inputs = p(images=images, return_tensors="pt")
        inputs = inputs.to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        if "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]  # only the new tokens, not the prompt
        return p.batch_decode(out, skip_special_tokens=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _needs(batch, self.cfg.overwrite)
        if not rows:
            return batch
        return _fill(batch, rows, self.captions(_images(batch, rows)), self.filter_cfg)


def image_message(data: bytes, prompt: str) -> list[dict]:
    """One user turn holding an image (as a data URL of its own bytes) and the prompt."""
    kind = "jpeg" if data[:2] == b"\xff\xd8" else "png"   # (the engine decodes by content)
    url = f"data:image/{kind};base64,{base64.b64encode(data).decode()}"
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]


def caption_dataset(ds, cfg: CaptionsConfig, filter_cfg):
    """The corpus Dataset with its captions filled (lazy: the synth job writes it)."""
    from cir.actor_pool import actor_pool
    from cir.raycluster import gpus_per_actor

    if cfg.captioner == "vllm":
        return _vllm_captions(ds, cfg, filter_cfg)
    cls = GeneratorCaptioner if cfg.captioner == "generator" else HFCaptioner
    gpus = gpus_per_actor(cfg.gpus_per_actor)
    return ds.map_batches(cls, fn_constructor_args=(cfg, filter_cfg), batch_size=cfg.batch_size, batch_format="pyarrow",
                          **actor_pool(cfg.num_actors, num_cpus=cfg.cpus_per_actor,
                                       **({"num_gpus": gpus} if gpus else {})))


def _vllm_captions(ds, cfg: CaptionsConfig, filter_cfg):
    """Every image through a vLLM VLM processor (rows that keep their caption pass
    through untouched); the processor's multimodal stage parses the image turns."""
    from pathlib import Path

    from ray.data.llm import build_processor

    backend = vllm_backend(cfg)
    config = backend.processor_config(prepare_multimodal_stage={"enabled": True,
                                                                "chat_template_content_format": "openai"})
    columns = ds.schema().names
    sampling = {"max_tokens": cfg.max_new_tokens, "temperature": 0.0}

    def request(row: dict) -> dict:
        data = row.get("image")
        if data is None:
            data = Path(row["path"]).read_bytes()
        return {"messages": image_message(data, cfg.prompt), "sampling_params": sampling,
                **{c: row.get(c) for c in columns}}

    def answer(row: dict) -> dict:
        from cir.generate.quality import KEPT, text_reason

        text = (row.get("generated_text") or "").strip()
        out = {c: row.get(c) for c in columns}
        out["caption"] = text if text_reason(text, "", "", filter_cfg) == KEPT else None
        return out

    keep = ds.filter(lambda r: bool(r["caption"] and r["caption"].strip()) and not cfg.overwrite)
    todo = ds.filter(lambda r: cfg.overwrite or not (r["caption"] and r["caption"].strip()))
    return keep.union(build_processor(config, preprocess=request, postprocess=answer)(todo))
