"""The CoLLM-style query composer.

    CLIP image embedding [B, d_clip] -> adapter -> n visual tokens in the LLM's input
    embedding space, spliced into an instruction prompt at `<img>` -> LLM / LLEM ->
    pooling -> projection -> L2-normalised query [B, embed_dim]

The adapter takes the pooled CLIP embedding rather than pixels because CoLLM builds
reference embeddings by Slerp between pooled embeddings: a synthetic reference has no
pixels. `image_features(pixels)` runs the vision tower for callers that have images.
Targets live in (a learnt linear map of) the CLIP image space by default, so a gallery
embedded once by CLIP can be reused.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cir.losses import clamp_logit_scale
from cir.models import llm as llm_lib
from cir.models.config import ComposerConfig
from cir.models.prompts import PromptBuilder
from cir.models.vision import build_vision_tower


class TokenAdapter(nn.Module):
    """A vector -> n tokens of width `hidden` (MLP), scaled like the LLM's own token
    embeddings so the LLM sees inputs of the magnitude it was trained on."""

    def __init__(self, d_in: int, hidden: int, n_tokens: int, mid: int, init_rms: float):
        super().__init__()
        self.n, self.hidden = n_tokens, hidden
        self.mlp = nn.Sequential(nn.Linear(d_in, mid), nn.GELU(), nn.Linear(mid, n_tokens * hidden))
        self.norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.norm.weight.fill_(init_rms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(x).view(x.shape[0], self.n, self.hidden))


class Composer(nn.Module):
    def __init__(self, cfg: ComposerConfig, *, llm_folder=None, preprocess_cfg: dict | None = None,
                 load_pretrained: bool = True):
        """load_pretrained=False (with llm_folder, preprocess_cfg) builds the architecture
        only, for `export.load_composer` to fill from a checkpoint."""
        super().__init__()
        self.cfg = cfg
        tower = build_vision_tower(cfg.vision, load_pretrained, preprocess_cfg)
        self.visual, self.preprocess, self.preprocess_cfg, self.d_clip = tower
        self.visual.requires_grad_(cfg.vision_trainable)

        model, self.tokenizer = llm_lib.load_llm(cfg.llm, cfg.llm_dtype, folder=llm_folder)
        self.decoder_only = llm_lib.is_decoder_only(model.config)
        emb = model.get_input_embeddings()
        self.hidden = int(emb.embedding_dim)
        w = emb.weight.detach()
        # (a ZeRO-3 partitioned weight is empty here: fall back to unit scale)
        init_rms = float(w.float().pow(2).mean().sqrt()) if w.numel() else 1.0
        if cfg.gradient_checkpointing:
            # non-reentrant: text-only inputs carry no grad into the first layer.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            model = llm_lib.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        llm_lib.set_llm_trainable(model, cfg.llm_trainable)
        self.llm = model

        self.pooling = cfg.pooling or ("last" if self.decoder_only else "mean")
        append_eos = self.decoder_only if cfg.append_eos is None else cfg.append_eos
        self.prompts = PromptBuilder(self.tokenizer, cfg.n_visual_tokens, cfg.max_text_tokens, append_eos,
                                     self.decoder_only)
        self.embed_dim = cfg.embed_dim or self.d_clip
        mid = cfg.adapter_hidden or self.hidden
        self.adapter = TokenAdapter(self.d_clip, self.hidden, cfg.n_visual_tokens, mid, init_rms)
        self.prototype_adapter = (TokenAdapter(self.embed_dim, self.hidden, cfg.n_visual_tokens, mid,
                                               init_rms) if cfg.prototype_adapter else None)
        self.proj = nn.Linear(self.hidden, self.embed_dim)
        self.target_proj = None
        if cfg.target_path == "vision":
            self.target_proj = nn.Linear(self.d_clip, self.embed_dim, bias=False)
            with torch.no_grad():
                if self.d_clip == self.embed_dim:  # start exactly in the CLIP image space
                    self.target_proj.weight.copy_(torch.eye(self.embed_dim))
        # The contrastive temperature; shape [1], not 0-dim: DeepSpeed cannot build an
        # engine around a 0-dim parameter.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    # ---- frozen parts stay in eval mode (no dropout / norm statistics drift) ----
    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.vision_trainable:
            self.visual.eval()
        return self

    def scale(self) -> torch.Tensor:
        return clamp_logit_scale(self.logit_scale)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised CLIP image embeddings [B, d_clip] of preprocessed pixels."""
        with torch.set_grad_enabled(self.cfg.vision_trainable and torch.is_grad_enabled()):
            feats = self.visual(pixels.to(self.device))
        return F.normalize(feats.float(), dim=-1)

    def _run(self, template: str, texts, visual_tokens: torch.Tensor | None, batch: int,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = self.prompts(template, texts, batch)
        ids, mask = ids.to(self.device), mask.to(self.device)
        is_vis = ids < 0
        embeds = self.llm.get_input_embeddings()(ids.clamp_min(0))
        if visual_tokens is not None:
            embeds = embeds.masked_scatter(is_vis.unsqueeze(-1), visual_tokens.to(embeds.dtype))
        kwargs = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.decoder_only:
            # positions count real tokens only, so left padding does not shift them.
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.llm(**kwargs).last_hidden_state
        out = self.proj(self._pool(hidden, mask).to(self.proj.weight.dtype)).float()
        if residual is not None:
            out = out + residual.float()
        return F.normalize(out, dim=-1)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        pos = torch.arange(mask.shape[1], device=mask.device)
        # last: the highest real position; cls: the lowest (works for either padding side)
        idx = (mask * pos).argmax(-1) if self.pooling == "last" else (mask * (mask.shape[1] - pos)).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]

    def _visual_tokens(self, adapter: TokenAdapter, feats: torch.Tensor) -> torch.Tensor:
        # inputs follow each module's own dtype: DeepSpeed bf16 casts the whole model
        feats = feats.to(self.device, adapter.norm.weight.dtype)
        return adapter(feats).to(self.llm.get_input_embeddings().weight.dtype)

    # ---- query kinds (all return L2-normalised [B, embed_dim]) ----
    def encode_composed(self, image_feats: torch.Tensor, texts) -> torch.Tensor:
        self._check(image_feats, texts)
        vt = self._visual_tokens(self.adapter, image_feats)
        res = self.encode_target(image_feats) if self.cfg.residual else None
        return self._run(self.cfg.composed_template, list(texts), vt, len(texts), res)

    def encode_query(self, image_feats: torch.Tensor, texts) -> torch.Tensor:
        """The retrieval query of (reference, text): the composed query, or with
        `query_hops: 2` (a model trained with PTHA) hop 2 over the hop-1 prototype, the
        query PTHA aligns with the target."""
        if self.cfg.query_hops == 2:
            return self.encode_prototype_composed(self.encode_composed(image_feats, texts), texts)
        return self.encode_composed(image_feats, texts)

    def encode_image_query(self, image_feats: torch.Tensor) -> torch.Tensor:
        vt = self._visual_tokens(self.adapter, image_feats)
        return self._run(self.cfg.image_template, None, vt, image_feats.shape[0])

    def encode_text_query(self, texts) -> torch.Tensor:
        return self._run(self.cfg.text_template, list(texts), None, len(texts))

    def encode_prototype_composed(self, prototype_emb: torch.Tensor, texts) -> torch.Tensor:
        """PTHA hop 2: a hop-1 prototype [B, embed_dim] composed with the text."""
        if self.prototype_adapter is None:
            raise ValueError("this composer was built with prototype_adapter=False")
        self._check(prototype_emb, texts)
        vt = self._visual_tokens(self.prototype_adapter, prototype_emb)
        res = prototype_emb if self.cfg.residual else None
        return self._run(self.cfg.prototype_template or self.cfg.composed_template, list(texts), vt,
                         len(texts), res)

    def encode_target(self, image_feats: torch.Tensor) -> torch.Tensor:
        if self.target_proj is None:
            return self.encode_image_query(image_feats)
        feats = image_feats.to(self.device, self.target_proj.weight.dtype)
        return F.normalize(self.target_proj(feats).float(), dim=-1)

    @staticmethod
    def _check(feats, texts):
        if feats.shape[0] != len(texts):
            raise ValueError(f"{feats.shape[0]} image rows for {len(texts)} texts")

    def trainable_parameters_summary(self) -> str:
        groups = {"visual": self.visual, "adapter": self.adapter, "prototype_adapter": self.prototype_adapter,
                  "llm": self.llm, "proj": self.proj, "target_proj": self.target_proj}
        lines, tot_t, tot_n = [], 0, 0
        for name, mod in groups.items():
            if mod is None:
                continue
            params = list(mod.parameters())
            n = sum(p.numel() for p in params)
            t = sum(p.numel() for p in params if p.requires_grad)
            tot_t, tot_n = tot_t + t, tot_n + n
            lines.append(f"  {name:<18} {t:>12,} / {n:>12,} trainable")
        t = self.logit_scale.numel() if self.logit_scale.requires_grad else 0
        lines.append(f"  {'logit_scale':<18} {t:>12,} / {1:>12,} trainable")
        tot_t, tot_n = tot_t + t, tot_n + 1
        head = (f"Composer(vision={self.cfg.vision}, llm={self.cfg.llm}, llm_trainable={self.cfg.llm_trainable}, "
                f"pooling={self.pooling}, embed_dim={self.embed_dim}): {tot_t:,} of {tot_n:,} parameters "
                f"trainable ({100 * tot_t / max(tot_n, 1):.2f}%)")
        return "\n".join([head] + lines)


def build_composer(cfg: ComposerConfig | None = None) -> Composer:
    return Composer(cfg or ComposerConfig())
