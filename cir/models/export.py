"""Composer checkpoints (safetensors + JSON, never pickle) and the evaluation-side encoder.

An exported folder is self-contained, so a node that reaches no model hub can load it:

    config.json          format, format_version, the ComposerConfig, preprocessing, sizes
    model.safetensors    every tensor of the composer: vision tower, adapters, the LLM's
                         base weights and its LoRA weights unmerged, projections, logit scale
    llm/                 the LLM's Hugging Face config.json and tokenizer files (JSON/text)

LoRA is saved unmerged (base + lora_A/lora_B, exactly the training-time tensors) because
merging W + BA changes float rounding, and the reloaded model must give identical
embeddings. For a 7B LLM the file holds the full base weights too (tens of GB in bf16):
the price of a checkpoint that never depends on a Hub id still resolving to the same
weights.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

FORMAT = "cir-composer"
# 2: the retrieval query is the composer config's `query_hops` (version 1 exports name
# the training loss instead; a PTHA loss there means hop 2).
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LLM_DIR = "llm"


def export_composer(model, cfg=None, out_dir: str | Path = "export", extra: dict | None = None) -> Path:
    """Write `model` (a Composer with full, unsharded parameters: gather ZeRO-3 shards
    first) to `out_dir`, replacing any earlier export there atomically: everything is
    written to a temporary sibling folder which is then renamed into place."""
    from safetensors.torch import save_file

    from cir.models import llm as llm_lib

    from cir.outputs import atomic_path, write_json_atomic

    cfg = cfg or model.cfg
    out = Path(out_dir).resolve()
    with atomic_path(out, directory=True) as tmp:
        llm_lib.unwrap(model.llm).config.save_pretrained(tmp / LLM_DIR)
        model.tokenizer.save_pretrained(str(tmp / LLM_DIR))
        # Cloned tensors: under DeepSpeed, parameters are views into flat buffers,
        # which safetensors refuses to save as they are.
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT,
                                                             "format_version": str(FORMAT_VERSION)})
        write_json_atomic(tmp / CONFIG_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "composer": asdict(cfg),
            "lora": "unmerged" if cfg.lora else "none",
            "weights": WEIGHTS_FILE, "llm_folder": LLM_DIR,
            "preprocess_cfg": _jsonable(model.preprocess_cfg),
            "d_clip": model.d_clip, "embed_dim": model.embed_dim, "hidden": model.hidden,
            "decoder_only": model.decoder_only, "pooling": model.pooling,
            "extra": extra or {},
        })
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def preprocess_from_json(cfg: dict) -> dict:
    """An exported preprocessing config as open_clip takes it (JSON lists back to tuples)."""
    pre = dict(cfg)
    for k in ("size", "mean", "std"):
        if isinstance(pre.get(k), list):
            pre[k] = tuple(pre[k])
    return pre


def read_export_config(out_dir) -> dict:
    """The export's config.json (a local folder or a `cir.storage` URI / location)."""
    from cir.storage import resolve

    path = resolve(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} is not an exported composer (no {CONFIG_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this code "
                         f"reads ({FORMAT_VERSION})")
    if int(meta["format_version"]) == 1:
        trained_with_ptha = (meta.pop("loss", None) or {}).get("objective") == "ptha"
        meta["composer"]["query_hops"] = 2 if trained_with_ptha and meta["composer"].get(
            "prototype_adapter", True) else 1
    return meta


def load_composer(out_dir, device: str = "cpu"):
    """Rebuild an exported composer in eval mode from a local folder, or from a URI
    through the local cache (`cir.storage.local_copy`). Reads JSON, tokenizer files and
    safetensors only; builds the architectures with random weights (under a forked RNG,
    so the caller's random stream is untouched) and overwrites every tensor."""
    from safetensors.torch import load_model

    from cir.config import from_dict
    from cir.models.composer import Composer, ComposerConfig

    from cir.storage import local_copy

    out = local_copy(out_dir, "composer export")
    meta = read_export_config(out)
    cfg = from_dict(ComposerConfig, meta["composer"], f"{out / CONFIG_FILE}: composer")
    pre = preprocess_from_json(meta["preprocess_cfg"])
    with torch.random.fork_rng(devices=[]):
        model = Composer(cfg, llm_folder=out / meta.get("llm_folder", LLM_DIR), preprocess_cfg=pre,
                         load_pretrained=False)
    load_model(model, str(out / meta.get("weights", WEIGHTS_FILE)), strict=True)
    return model.to(device).eval()


class ComposerQueryEncoder:
    """The `cir.query_encoders.QueryEncoder` interface over an exported composer.

    Queries: (reference image, text) -> composed query; a None text gives the image-only
    query and a None image the text-only one. Gallery: the target path."""

    uses_images = True
    uses_texts = True

    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None,
                 precision: str = "fp32", batch_size: int = 64, expected_encoder: str | None = None):
        from cir.encoders import pick_device

        if threads:
            torch.set_num_threads(threads)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.device = pick_device(device)
        self.model = load_composer(path, self.device)
        self.name = f"checkpoint:{path}"
        self.encoder = self.model.cfg.vision
        self.dim = int(self.model.embed_dim)
        self.batch_size = int(batch_size)
        self.autocast = precision == "bf16" and self.device.startswith("cuda")
        if expected_encoder and expected_encoder.removeprefix("open_clip:") != self.encoder.removeprefix("open_clip:"):
            warnings.warn(f"{self.name} has its own vision tower {self.encoder!r}; "
                          f"ignoring encoder {expected_encoder!r}")

    def __repr__(self) -> str:
        return f"ComposerQueryEncoder({self.name!r})"

    def _context(self):
        import contextlib

        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _feats(self, images) -> torch.Tensor:
        pixels = torch.stack([self.model.preprocess(im) for im in images])
        return self.model.image_features(pixels)

    def encode_gallery(self, images: Sequence) -> np.ndarray:
        out = np.zeros((len(images), self.dim), np.float32)
        with torch.inference_mode(), self._context():
            for s in range(0, len(images), self.batch_size):
                chunk = list(images[s:s + self.batch_size])
                out[s:s + len(chunk)] = self.model.encode_target(self._feats(chunk)).float().cpu().numpy()
        return out

    def encode_queries(self, ref_images: Sequence, texts: Sequence[str]) -> np.ndarray:
        if len(ref_images) != len(texts):
            raise ValueError(f"{len(ref_images)} reference images for {len(texts)} texts")
        out = np.zeros((len(texts), self.dim), np.float32)
        kinds = {"composed": [], "image": [], "text": []}
        for i, (im, t) in enumerate(zip(ref_images, texts)):
            if im is None and t is None:
                raise ValueError(f"query {i} has neither a reference image nor a text")
            kinds["text" if im is None else "image" if t is None else "composed"].append(i)
        m = self.model
        with torch.inference_mode(), self._context():
            for kind, rows in kinds.items():
                for s in range(0, len(rows), self.batch_size):
                    idx = rows[s:s + self.batch_size]
                    if kind == "text":
                        q = m.encode_text_query([texts[i] for i in idx])
                    elif kind == "image":
                        q = m.encode_image_query(self._feats([ref_images[i] for i in idx]))
                    else:
                        q = m.encode_query(self._feats([ref_images[i] for i in idx]), [texts[i] for i in idx])
                    out[idx] = q.float().cpu().numpy()
        return out
