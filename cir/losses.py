"""Contrastive objectives for the composer, and Slerp for synthetic reference embeddings.

Conventions shared by every loss here:
* `logit_scale` is the multiplier applied to cosine similarities (CLIP's exp(t), already
  exponentiated and clamped by the caller), a float or a tensor of shape [] or [1].
* Inputs are L2-normalised rows; a query's positive is the target in the same row.
* Negatives are the other targets of the global batch: when torch.distributed is
  initialised with more than one process, targets are all-gathered with a
  gradient-carrying all-gather and the labels of rank r start at r * B. Each rank keeps
  its own queries (the loss is the mean over local queries), so the usual DDP gradient
  average over ranks equals the gradient of the loss on the concatenated batch. Every
  rank must pass the same local batch size.

Which objective follows which source:
* `info_nce`: CLIP-style query->target cross-entropy. CoLLM and PTHA both train in the
  query->target direction only, so `symmetric=False` is the default; `symmetric=True`
  averages it with target->query (the CLIP loss).
* `collm_three_way`: CoLLM's sum of three query->target losses (composed, image-only,
  text-only), all against the same target embeddings.
* `ptha_loss`: PTHA's L_q2t + w_t2t * L_t2t + w_p2p * L_p2p with the reverse prototype
  detached; defaults follow the authors' code (see `PTHA_DEFAULTS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# PTHA defaults follow the authors' released code: MSE between prototypes, w_t2t = 0.4,
# w_p2p = 0.4. The paper's ablation reports w_p2p = 0.5 as best; pass it explicitly to
# follow the paper instead.
PTHA_DEFAULTS = {"w_t2t": 0.4, "w_p2p": 0.4, "p2p_kind": "mse"}
OBJECTIVES = ("infonce", "collm3", "ptha")


@dataclass
class LossConfig:
    """Which training objective a stage trains with (`cir.train.objectives`), and its knobs."""

    objective: str = "infonce"
    gather: bool = True
    symmetric: bool = False
    # collm3: weights of (composed, image-only, text-only).
    collm_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # collm3: image-only query from the reference ("ref"; in CoLLM pre-training the
    # reference is the Slerp of the target and its neighbour) or the target itself ("tgt").
    collm_image_query: str = "ref"
    w_t2t: float = PTHA_DEFAULTS["w_t2t"]
    w_p2p: float = PTHA_DEFAULTS["w_p2p"]
    p2p_kind: str = PTHA_DEFAULTS["p2p_kind"]

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.p2p_kind not in ("mse", "contrastive"):
            raise ValueError(f"p2p_kind must be 'mse' or 'contrastive', got {self.p2p_kind!r}")
        if self.collm_image_query not in ("ref", "tgt"):
            raise ValueError(f"collm_image_query must be 'ref' or 'tgt', got {self.collm_image_query!r}")
        if len(self.collm_weights) != 3:
            raise ValueError("collm_weights needs three weights (composed, image, text)")
        self.collm_weights = tuple(float(w) for w in self.collm_weights)


def _dist_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: torch.Tensor, gather: bool = True) -> tuple[torch.Tensor, int]:
    """(rows of `x` from every rank, concatenated in rank order; this rank's row offset).

    A plain `dist.all_gather` returns tensors cut from the graph, so the other ranks'
    queries would push no gradient into this rank's targets; the autograd-aware one in
    `torch.distributed.nn` sends those gradients back (a reduce-scatter in backward)."""
    world, rank = _dist_world()
    if not gather or world == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0), rank * x.shape[0]


def _scale(logit_scale) -> torch.Tensor | float:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.reshape(())
    return float(logit_scale)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # softmax / squared errors in half precision lose too much; float64 stays float64
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _ce(query, keys, offset, scale) -> torch.Tensor:
    logits = scale * _upcast(query) @ _upcast(keys).t()
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return F.cross_entropy(logits, labels)


def info_nce(query: torch.Tensor, target: torch.Tensor, logit_scale, gather: bool = True,
             symmetric: bool = False) -> torch.Tensor:
    """Cross-entropy of each query over all (gathered) targets; the positive is its row."""
    if query.shape != target.shape:
        raise ValueError(f"query {tuple(query.shape)} and target {tuple(target.shape)} differ")
    scale = _scale(logit_scale)
    all_t, offset = gather_with_grad(target, gather)
    loss = _ce(query, all_t, offset, scale)
    if symmetric:
        all_q, _ = gather_with_grad(query, gather)
        loss = 0.5 * (loss + _ce(target, all_q, offset, scale))
    return loss


def collm_three_way(composed_q, image_q, text_q, target, logit_scale, weights=(1.0, 1.0, 1.0),
                    gather: bool = True, symmetric: bool = False) -> dict:
    """CoLLM's 3-way contrastive loss: sum_k w_k * InfoNCE(query_k -> target).

    Pairing (our reading of the paper): every query kind points at the same target
    image: composed = (reference, modification text), image-only = the reference alone
    (during pre-training the Slerp-ed neighbour of the target), text-only = the text
    alone (the target's caption when the data has one). A query kind can be None to
    leave its term out."""
    parts = {}
    total = target.new_zeros(())
    for name, q, w in zip(("composed", "image", "text"), (composed_q, image_q, text_q), weights):
        if q is None or w == 0:
            continue
        parts[name] = info_nce(q, target, logit_scale, gather, symmetric)
        total = total + w * parts[name]
    return {"loss": total, **parts}


def ptha_loss(q2t_query, target, t2t_query, proto, reverse_proto, logit_scale,
              w_t2t: float = PTHA_DEFAULTS["w_t2t"], w_p2p: float = PTHA_DEFAULTS["w_p2p"],
              p2p_kind: str = PTHA_DEFAULTS["p2p_kind"], gather: bool = True) -> dict:
    """PTHA: L = L_q2t + w_t2t * L_t2t + w_p2p * L_p2p.

    q2t_query: hop-2 query (prototype composed with the text) -> target, InfoNCE.
    t2t_query: text-only query -> target, InfoNCE (None or w_t2t=0 drops the term).
    proto / reverse_proto: hop-1 prototypes of (reference, text) and (target, reverse
    text). The reverse one is detached, so L_p2p only moves the forward prototype
    towards it (the authors' stop-gradient; without it both collapse together).
    p2p_kind "mse": mean squared error over all elements (F.mse_loss, the authors'
    code); "contrastive": InfoNCE(proto -> reverse_proto) over the batch.
    reverse_proto None (no reverse texts) drops L_p2p."""
    out = {"q2t": info_nce(q2t_query, target, logit_scale, gather)}
    total = out["q2t"]
    if t2t_query is not None and w_t2t:
        out["t2t"] = info_nce(t2t_query, target, logit_scale, gather)
        total = total + w_t2t * out["t2t"]
    if reverse_proto is not None and w_p2p and proto.shape[0] > 0:
        rev = reverse_proto.detach()
        if p2p_kind == "mse":
            out["p2p"] = F.mse_loss(_upcast(proto), _upcast(rev))
        elif p2p_kind == "contrastive":
            out["p2p"] = info_nce(proto, rev, logit_scale, gather)
        else:
            raise ValueError(f"p2p_kind must be 'mse' or 'contrastive', got {p2p_kind!r}")
        total = total + w_p2p * out["p2p"]
    out["loss"] = total
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, alpha, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between unit rows a and b: alpha=0 gives a, 1 gives b.

    `alpha` is a float or a tensor broadcastable to [B, 1] (one per row). Inputs are
    normalised first. Where a and b are (nearly) parallel, sin(angle) vanishes and the
    weights lose precision, so those rows use normalised linear interpolation, which
    agrees with Slerp to first order there. Antipodal rows have no unique great circle;
    the result there is whatever nlerp gives (not meaningful)."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    alpha = torch.as_tensor(alpha, dtype=a.dtype, device=a.device)
    if alpha.dim() == 1:
        alpha = alpha.unsqueeze(-1)
    cos = (a * b).sum(-1, keepdim=True)
    # angle from atan2(|b - cos*a|, cos): accurate at small angles, unlike acos(cos).
    # (clamped so that the gradient stays finite at exactly parallel rows)
    sin = (b - cos * a).pow(2).sum(-1, keepdim=True).clamp_min(1e-30).sqrt()
    omega = torch.atan2(sin, cos)
    near = sin < eps
    safe_sin = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.sin((1 - alpha) * omega) / safe_sin
    wb = torch.sin(alpha * omega) / safe_sin
    spherical = wa * a + wb * b
    linear = F.normalize((1 - alpha) * a + alpha * b, dim=-1)
    return torch.where(near, linear, spherical)


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in radians between rows of a and b (stable at small angles)."""
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    cos = (a * b).sum(-1)
    sin = (b - cos.unsqueeze(-1) * a).norm(dim=-1)
    return torch.atan2(sin, cos)


def clamp_logit_scale(log_scale: torch.Tensor, max_scale: float = 100.0) -> torch.Tensor:
    """exp(log_scale) capped at `max_scale` (CLIP's cap; larger scales destabilise)."""
    return log_scale.clamp(max=math.log(max_scale)).exp()
