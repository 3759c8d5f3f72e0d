"""The composer's vision tower: the image tower of an open_clip model, with its preprocessing."""
from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch


class VisionTower(NamedTuple):
    visual: torch.nn.Module          # image tower: preprocessed pixels -> [B, dim]
    preprocess: object               # PIL image -> pixel tensor (the eval transform)
    preprocess_cfg: dict             # size, mean, std, interpolation, resize_mode
    dim: int


@contextlib.contextmanager
def _quiet_logging(quiet: bool):
    if not quiet:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def build_vision_tower(name: str, load_pretrained: bool = True, preprocess_cfg: dict | None = None) -> VisionTower:
    """The image tower of open_clip model `name`.

    load_pretrained=False builds the architecture only (quietly: open_clip would warn
    that it is random), for a caller that fills it from a checkpoint; `preprocess_cfg`
    is then the exported preprocessing, which a pretrained tag may have set. Weights it
    does not load come from `cir.embed.ENCODER_SEED`, as every other encoding here does,
    so a tower without weights (a built-in config) is the one that computed the
    features cached for training."""
    from cir.embed import ENCODER_SEED
    from cir.encoders import _open_clip, parse_encoder_name, seeded_init, validate_encoder_name

    parsed = validate_encoder_name(name) if load_pretrained else parse_encoder_name(name)
    pp = {}
    if preprocess_cfg:
        pp = dict(force_image_size=preprocess_cfg["size"], image_mean=preprocess_cfg["mean"],
                  image_std=preprocess_cfg["std"], image_interpolation=preprocess_cfg["interpolation"],
                  image_resize_mode=preprocess_cfg["resize_mode"])
    with _quiet_logging(not load_pretrained), seeded_init(ENCODER_SEED):
        clip, _, preprocess = _open_clip().create_model_and_transforms(
            parsed.arch, pretrained=parsed.pretrained if load_pretrained else None, **pp)
    visual = clip.visual  # the text tower is not needed
    cfg = dict(visual.preprocess_cfg)
    dim = getattr(visual, "output_dim", None)
    if dim is None:  # towers without the attribute: measure it
        with torch.no_grad():
            size = cfg["size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            dim = visual(torch.zeros(1, 3, *size)).shape[-1]
    return VisionTower(visual, preprocess, cfg, int(dim))
