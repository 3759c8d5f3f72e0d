"""Train an open_clip model contrastively on (image, caption) pairs of a corpus table.

Plain PyTorch, one process, CPU or CUDA: AdamW, a linear warm-up then cosine decay of the
learning rate, the symmetric InfoNCE loss of CLIP (`open_clip.loss.ClipLoss`) with the
model's learnable logit scale. No augmentation. Images are decoded once into a uint8
tensor and normalised per batch exactly as the model's eval preprocessing does (ToTensor
then Normalize; images of another size are first resized and centre-cropped like
open_clip's "shortest" resize mode), so training and `cir.encoders.ClipEncoder` see the
same pixels. Weights are saved as safetensors (fp16 by default), never pickles, and load
back with `ClipEncoder("ARCH/path/to/weights.safetensors")`.

Used by `jobs/train_clip.py`, which trains the shipped `cir/weights/cir-shapes.safetensors`
and reports its held-out figures with `cir.clip_eval`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cir.encoders import _open_clip, decode_image, pick_device
from cir.metrics import embedding_recall
from cir.optim import warmup_cosine
from cir.outputs import atomic_path


@dataclass
class TrainConfig:
    model: str = "cir-shapes"  # an open_clip architecture name (built-in configs included)
    epochs: float = 10.0  # may be fractional: training stops after round(epochs * n / batch) steps
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # the cosine decays from lr to lr * min_lr_ratio
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    device: str = "auto"
    log_every: int = 50  # a progress line every this many steps (0: none)


# ----------------------------------------------------------------------------- data

def image_size_of(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def decode_images(blobs, image_size: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (N, 3, S, S) of the model's input pixels."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    fit = [Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size)]
    out = torch.empty((len(blobs), 3, image_size, image_size), dtype=torch.uint8)
    for i, blob in enumerate(blobs):
        im = decode_image(blob)
        if im.size != (image_size, image_size):
            for t in fit:
                im = t(im)
        out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def normaliser(model):
    """uint8 (N, 3, S, S) -> the float tensor the model's eval preprocessing would make."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean") or OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std") or OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def normalise(pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().div_(255)
        return (x - mean.to(x.device)) / std.to(x.device)

    return normalise


def load_pairs(table, model_name: str, image_size: int):
    """(uint8 images, token ids) of a corpus table with `image` bytes and `caption`."""
    for col in ("image", "caption"):
        if col not in table.column_names:
            raise ValueError(f"corpus table needs an {col!r} column; it has {table.column_names}")
    captions = table.column("caption").to_pylist()
    if any(c is None or not str(c).strip() for c in captions):
        raise ValueError("every corpus row needs a non-empty caption to train CLIP")
    images = decode_images(table.column("image").to_pylist(), image_size)
    tokens = _open_clip().get_tokenizer(model_name)(captions)
    return images, tokens


def corpus_pairs(folder, model_name: str, image_size: int):
    """(uint8 images, token ids, family of each image) of a `write_corpus` folder."""
    table = pq.read_table(folder)
    images, tokens = load_pairs(table, model_name, image_size)
    return images, tokens, table.column("category").to_pylist()


# --------------------------------------------------------------------------- model

def create_model(name: str, device: str = "cpu", seed: int = 0):
    """A randomly initialised open_clip model (seeded) in train mode."""
    torch.manual_seed(seed)
    model = _open_clip().create_model(name, device=device, output_dict=True)
    model.train()
    return model


@torch.inference_mode()
def embed(model, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
          batch_size: int = 512) -> np.ndarray:
    """L2-normalised float32 rows for uint8 images or token ids (model left in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    normalise = normaliser(model)
    rows = []
    data = images if images is not None else tokens
    for start in range(0, len(data), batch_size):
        chunk = data[start:start + batch_size].to(device)
        feats = (model.encode_image(normalise(chunk), normalize=True) if images is not None
                 else model.encode_text(chunk, normalize=True))
        rows.append(feats.float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def _param_groups(model, weight_decay: float):
    """No weight decay on gains, biases, the logit scale and other 0/1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    return warmup_cosine(step, cfg.warmup_steps, total, peak=cfg.lr, floor=cfg.lr * cfg.min_lr_ratio)


def train(images: torch.Tensor, tokens: torch.Tensor, cfg: TrainConfig, model=None, log=print):
    """Train (a new seeded model unless `model` is given) and return (model, history).

    `history` is a list of (step, loss) for every step. The model comes back in eval mode.
    `cfg.threads` applies while training; torch's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(images, tokens, cfg, model, log)
    finally:
        torch.set_num_threads(threads)


def _train(images, tokens, cfg: TrainConfig, model, log):
    if len(images) != len(tokens) or len(images) < 2:
        raise ValueError(f"need at least 2 image-caption pairs of each, got {len(images)} images "
                         f"and {len(tokens)} captions")
    device = pick_device(cfg.device)
    model = model if model is not None else create_model(cfg.model, device, cfg.seed)
    model.train()
    normalise = normaliser(model)
    loss_fn = _open_clip().loss.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    n = len(images)
    batch = min(cfg.batch_size, n)
    per_epoch = n // batch  # the last partial batch of an epoch is dropped
    total = max(1, round(cfg.epochs * per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[tuple[int, float]] = []
    order = torch.randperm(n, generator=gen)
    t0 = t_log = time.perf_counter()
    for step in range(total):
        slot = step % per_epoch
        if slot == 0 and step > 0:
            order = torch.randperm(n, generator=gen)
        idx = order[slot * batch:(slot + 1) * batch]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        out = model(normalise(images[idx].to(device)), tokens[idx].to(device))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append((step, loss.item()))
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
            now = time.perf_counter()
            recent = [v for _, v in history[-cfg.log_every:]]
            k = len(recent)
            log(f"step {step + 1}/{total} epoch {(step + 1) / per_epoch:.2f} "
                f"loss {np.mean(recent):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"logit_scale {model.logit_scale.exp().item():.1f} "
                f"{k * batch / max(now - t_log, 1e-9):.0f} samples/s "
                f"elapsed {now - t0:.0f}s")
            t_log = now
    model.eval()
    return model, history


# ---------------------------------------------------------------------------- save

def save_weights(model, path, dtype: str = "fp16", metadata: dict | None = None) -> Path:
    """Write the model's state dict as safetensors (atomically, `cir.outputs.atomic_path`).

    Floating tensors are stored as fp16 (or fp32); open_clip's loader copies them into
    the fp32 model, casting. `metadata` values are stored as strings in the header.
    """
    from safetensors.torch import save_file

    if dtype not in ("fp16", "fp32"):
        raise ValueError(f"dtype must be fp16 or fp32, got {dtype!r}")
    cast = torch.float16 if dtype == "fp16" else torch.float32
    state = {k: (v.detach().to("cpu", cast) if v.is_floating_point() else v.detach().cpu())
             .contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def round_weights(model, dtype: str = "fp16"):
    """Round the model's floating parameters through `dtype` in place, so that it matches
    what `save_weights(model, ..., dtype)` stored. Returns the model."""
    if dtype == "fp16":
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    return model


def config_metadata(cfg: TrainConfig, **extra) -> dict:
    skip = ("log_every", "device")  # how it was run, not what it trained
    return {**{f"train.{k}": v for k, v in asdict(cfg).items() if k not in skip}, **extra}


# ------------------------------------------------------------------------- metrics

def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, ks=(1, 5)) -> dict:
    """Row i of each is a pair. text->image Recall@k and image->text Recall@k, as
    fractions (0.96, not 96) under the keys "t2i_R@k" and "i2t_R@k". Exactly tied
    scores rank the lower row first (`cir.metrics.rank_by_similarity`)."""
    pairs = np.arange(len(image_emb))
    t2i = embedding_recall(text_emb, image_emb, pairs, ks)
    i2t = embedding_recall(image_emb, text_emb, pairs, ks)
    return {**{f"t2i_R@{k}": v / 100 for k, v in t2i.items()},
            **{f"i2t_R@{k}": v / 100 for k, v in i2t.items()}}


def neighbour_stats(emb: np.ndarray, groups=None, percentiles=(1, 10, 50, 90, 99)) -> dict:
    """Cosine of each row's nearest other row and of all pairs (percentiles), and if
    `groups` is given the share of rows whose nearest neighbour is in the same group
    (plus the percentiles of nearest-neighbour cosine for same- and other-group hits)."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    nn = sims.argmax(1)
    nn_sim = sims[np.arange(len(emb)), nn]
    pairs = sims[np.triu_indices(len(emb), 1)]
    pct = lambda a: {p: float(np.percentile(a, p)) for p in percentiles} if len(a) else {}
    out = {"nn_cosine": pct(nn_sim), "all_pairs_cosine": pct(pairs)}
    if groups is not None:
        groups = np.asarray(groups)
        same = groups[nn] == groups
        out["nn_same_group"] = float(same.mean())
        out["nn_cosine_same_group"] = pct(nn_sim[same])
        out["nn_cosine_other_group"] = pct(nn_sim[~same])
        iu = np.triu_indices(len(emb), 1)
        pair_same = groups[iu[0]] == groups[iu[1]]
        out["pairs_cosine_same_group"] = pct(pairs[pair_same])
        out["pairs_cosine_other_group"] = pct(pairs[~pair_same])
    return out
