"""Training objectives: modules around the composer whose forward is the loss of a batch.

DeepSpeed wraps the objective, not the composer, because ZeRO-3 gathers parameters only
inside `forward`: the loss must be computed there. A batch holds `ref_feats` (or
`ref_pixels`), `tgt_feats` (or `tgt_pixels`) and `texts`; PTHA reads `reverse_texts`
(None rows are left out of L_p2p), CoLLM's 3-way loss `captions` (the text-only query's
text; the modification texts by default). Each objective also names the retrieval
query it aligns with the target (`query_hops`), which the export records.
"""
from __future__ import annotations

import abc

import torch
import torch.nn as nn

from cir.losses import LossConfig, collm_three_way, info_nce, ptha_loss


def batch_features(composer, batch: dict, key: str) -> torch.Tensor:
    """The pooled image features of `key` ("ref" or "tgt"): cached, or from pixels."""
    if batch.get(f"{key}_feats") is not None:
        return batch[f"{key}_feats"].to(composer.device, torch.float32)
    if batch.get(f"{key}_pixels") is not None:
        return composer.image_features(batch[f"{key}_pixels"])
    raise KeyError(f"batch needs {key}_feats or {key}_pixels")


class Objective(nn.Module, abc.ABC):
    query_hops = 1

    def __init__(self, composer, loss: LossConfig):
        super().__init__()
        self.composer, self.loss = composer, loss

    def forward(self, batch: dict) -> dict:
        c = self.composer
        texts = list(batch["texts"])
        ref, tgt = batch_features(c, batch, "ref"), batch_features(c, batch, "tgt")
        scale = c.scale()
        out = self.losses(batch, texts, ref, tgt, c.encode_target(tgt), scale)
        out = {k: (v if k == "loss" else v.detach()) for k, v in out.items()}
        out["logit_scale"] = scale.detach().reshape(())
        return out

    @abc.abstractmethod
    def losses(self, batch, texts, ref, tgt, target, scale) -> dict:
        """{"loss": the total to minimise, and its named parts} of one batch."""


class InfoNCEObjective(Objective):
    """Composed query -> target, InfoNCE."""

    def losses(self, batch, texts, ref, tgt, target, scale) -> dict:
        lc = self.loss
        loss = info_nce(self.composer.encode_composed(ref, texts), target, scale, lc.gather, lc.symmetric)
        return {"loss": loss, "composed": loss}


class CoLLMObjective(Objective):
    """CoLLM's 3-way loss: composed, image-only and text-only queries -> target."""

    def losses(self, batch, texts, ref, tgt, target, scale) -> dict:
        c, lc = self.composer, self.loss
        w = lc.collm_weights
        comp = c.encode_composed(ref, texts) if w[0] else None
        img = c.encode_image_query(ref if lc.collm_image_query == "ref" else tgt) if w[1] else None
        captions = batch.get("captions")
        txt = c.encode_text_query(list(captions) if captions is not None else texts) if w[2] else None
        return collm_three_way(comp, img, txt, target, scale, w, lc.gather, lc.symmetric)


class PTHAObjective(Objective):
    """PTHA's two hops: hop 1 (reference, text) -> prototype, pulled towards the reverse
    prototype of (target, reverse text); hop 2 (prototype, text) -> target."""

    query_hops = 2

    def __init__(self, composer, loss: LossConfig):
        super().__init__(composer, loss)
        if composer.prototype_adapter is None:
            raise ValueError("the ptha objective needs a composer built with prototype_adapter: true")

    def losses(self, batch, texts, ref, tgt, target, scale) -> dict:
        c, lc = self.composer, self.loss
        proto = c.encode_composed(ref, texts)              # hop 1
        query = c.encode_prototype_composed(proto, texts)  # hop 2
        t2t = c.encode_text_query(texts) if lc.w_t2t else None
        rev_texts = batch.get("reverse_texts")
        keep = [i for i, t in enumerate(rev_texts or []) if t is not None]
        rev = None
        if keep and lc.w_p2p:
            # the reverse side is stop-gradient anyway: no graph saves memory and time.
            with torch.no_grad():
                rev = c.encode_composed(tgt[keep], [rev_texts[i] for i in keep])
            proto = proto[keep]
        return ptha_loss(query, target, t2t, proto, rev, scale, lc.w_t2t, lc.w_p2p, lc.p2p_kind, lc.gather)


OBJECTIVES = {"infonce": InfoNCEObjective, "collm3": CoLLMObjective, "ptha": PTHAObjective}


def build_objective(composer, loss: LossConfig) -> Objective:
    """The objective of `loss` around `composer`. The composer's config is set to the
    query this objective trains, so that its export retrieves with that query."""
    objective = OBJECTIVES[loss.objective](composer, loss)
    composer.cfg.query_hops = objective.query_hops
    return objective
