"""Image and text encoders: open_clip models named by a config string.

Names look like `ViT-B-32` (random weights), `ViT-L-14/openai` (a pretrained tag,
downloaded on a cluster that reaches the model hub), `ViT-B-32/weights.safetensors`
(a local weights file), or one of the tiny built-in configs (`cir-tiny`, `cir-small`)
that are registered with open_clip at import time so that CPU runs need no download.
An optional `open_clip:` prefix is accepted, as in DESIGN.md.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUILTIN_CONFIG_DIR = Path(__file__).parent / "model_configs"
BUILTIN_MODELS = tuple(sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.json")))
WEIGHTS_DIR = Path(__file__).parent / "weights"
# Short names for shipped weights: name -> (architecture, weights file). `cir-shapes`
# is a tiny CLIP trained on the shapes world by jobs/train_clip.py (cir/weights/README.md).
SHIPPED = {"cir-shapes": ("cir-shapes", WEIGHTS_DIR / "cir-shapes.safetensors"),
           "cir-shapes-cells": ("cir-shapes-cells", WEIGHTS_DIR / "cir-shapes-cells.safetensors")}


@dataclass(frozen=True)
class EncoderName:
    arch: str
    pretrained: str | None = None
    alias: str | None = None  # the short name of shipped weights, e.g. "cir-shapes"

    def __str__(self) -> str:
        if self.alias:
            return self.alias
        return self.arch if self.pretrained is None else f"{self.arch}/{self.pretrained}"


def parse_encoder_name(name: str) -> EncoderName:
    """Split `[open_clip:]ARCH[/TAG-or-PATH]` into its parts (no validation)."""
    if not name or not name.strip():
        raise ValueError("encoder model name is empty")
    name = name.strip().removeprefix("open_clip:")
    if name in SHIPPED:
        arch, weights = SHIPPED[name]
        return EncoderName(arch, str(weights), alias=name)
    arch, _, pretrained = name.partition("/")
    return EncoderName(arch, pretrained or None)


def _open_clip():
    import open_clip
    from open_clip import factory

    if str(BUILTIN_CONFIG_DIR) not in map(str, factory._MODEL_CONFIG_PATHS):
        factory.add_model_config(BUILTIN_CONFIG_DIR)
    return open_clip


def validate_encoder_name(name: str) -> EncoderName:
    """Fail at once, naming the problem, if `name` is not a model we can build."""
    parsed = parse_encoder_name(name)
    open_clip = _open_clip()
    known = open_clip.list_models()
    if parsed.arch not in known:
        raise ValueError(
            f"unknown encoder model {parsed.arch!r} (from {name!r}); built-in: "
            f"{', '.join(BUILTIN_MODELS)}; open_clip has {len(known)} others, e.g. "
            "ViT-B-32, ViT-B-16, ViT-L-14 (see open_clip.list_models())"
        )
    tag = parsed.pretrained
    if tag is not None and not Path(tag).is_file():
        tags = open_clip.list_pretrained_tags_by_model(parsed.arch)
        if tag not in tags:
            raise ValueError(
                f"encoder {name!r}: {tag!r} is neither a weights file nor a pretrained "
                f"tag of {parsed.arch} (tags: {', '.join(tags) or 'none'})"
            )
    return parsed


@contextlib.contextmanager
def seeded_init(seed: int = 0):
    """Build models inside: weights a model does not load (a built-in config without a
    weights file) come from `seed`, so every process builds the same random tower; the
    caller's global torch RNG is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pick_device(device: str | None = None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ImageTooLarge(ValueError):
    """An image whose pixel count is over the caller's limit (a decode bomb, or just too big)."""


def decode_image(data: bytes, max_pixels: int | None = None, formats: tuple | None = None,
                 max_side: int | None = None):
    """Decode encoded image bytes to RGB; raises ValueError for anything unreadable (or in
    none of `formats`, PIL format names), and ImageTooLarge, before decoding, for more than
    `max_pixels` pixels. With `max_side`, the image is shrunk to at most that on its longest
    side, and a JPEG is decoded at the smallest DCT scale (1/2 .. 1/8) that keeps it at
    least that large, so a large photo is never held at full size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"image is {im.width}x{im.height} pixels, over the limit of {max_pixels:,}")
            if max_side and max(im.size) > max_side:
                scale = max(im.size) / max_side
                im.draft("RGB", (math.ceil(im.width / scale), math.ceil(im.height / scale)))
            im.load()
            if not max_side:
                return im.convert("RGB")
            # Palette and 1-bit images resample only by nearest neighbour: to RGB first.
            image = im.convert("RGB") if im.mode in ("1", "P", "PA") else im
            image.thumbnail((max_side, max_side))
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), checked as it opens the file.
        limit = f"; the limit here is {max_pixels:,} pixels" if max_pixels else ""
        raise ImageTooLarge(f"image rejected before decoding: {exc}{limit}") from exc
    except ImageTooLarge:
        raise
    except UnidentifiedImageError:
        kinds = f"a {', '.join(formats)} image" if formats else "a format PIL recognises"
        raise ValueError(f"not a readable image: not {kinds}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc


class ClipEncoder:
    """An open_clip model in eval mode that returns L2-normalised float32 numpy rows."""

    def __init__(self, name: str, device: str | None = None, threads: int | None = None,
                 precision: str = "fp32"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        parsed = validate_encoder_name(name)
        open_clip = _open_clip()
        self.name = str(parsed)
        self.device = pick_device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            parsed.arch, pretrained=parsed.pretrained, device=self.device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(parsed.arch)
        self.dim = int(self.model.text_projection.shape[-1]) if hasattr(
            self.model, "text_projection") and self.model.text_projection is not None else None
        if self.dim is None:
            self.dim = int(open_clip.get_model_config(parsed.arch)["embed_dim"])
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.autocast_dtype = torch.bfloat16 if (precision == "bf16" and self.device == "cuda") else None

    def _autocast(self):
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def encode_images(self, images) -> np.ndarray:
        """Embed a list of PIL images (already RGB)."""
        import torch

        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_image(pixels, normalize=True)
        return feats.float().cpu().numpy()

    def encode_texts(self, texts) -> np.ndarray:
        import torch

        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_text(tokens, normalize=True)
        return feats.float().cpu().numpy()

