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

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from cir.losses import LossConfig, clamp_logit_scale, collm_three_way, info_nce, ptha_loss
from cir.models import llm as llm_lib

IMG, TEXT = "<img>", "{text}"


@dataclass
class ComposerConfig:
    vision: str = "cir-tiny"                 # open_clip name, e.g. "ViT-L-14/openai"
    vision_trainable: bool = False
    llm: str = "builtin:tiny-bert"           # HF id or folder, "minilm", "builtin:tiny-bert"
    llm_dtype: str = "float32"
    lora: bool = True
    llm_trainable: str | None = None         # lora | full | frozen; None: lora if lora else frozen
    lora_r: int = 16                         # r/alpha/dropout: the E5-Mistral / SFR-Embedding
    lora_alpha: int = 32                     # LoRA recipe (r 16, alpha 32, dropout 0.1)
    lora_dropout: float = 0.1
    lora_targets: list | None = None         # None: by model type (llm.default_lora_targets)
    n_visual_tokens: int = 4
    adapter_hidden: int | None = None        # None: the LLM hidden size
    pooling: str | None = None               # mean | last | cls; None: mean (encoder) / last (decoder)
    append_eos: bool | None = None           # None: True for decoder-only models (last-token pooling
                                             # reads the EOS state, as SFR-Embedding / E5-Mistral do)
    embed_dim: int | None = None             # None: the CLIP embed dim
    target_path: str = "vision"              # vision | composer
    prototype_adapter: bool = True           # PTHA hop 2 (unused by infonce/collm3)
    residual: bool = False                   # composed query = LLM output + reference in target space
    composed_template: str = ("Retrieve an image that matches the reference image <img> "
                              "modified as follows: {text}")
    image_template: str = "Represent the image <img>"
    text_template: str = "Retrieve an image that matches: {text}"
    prototype_template: str | None = None    # None: composed_template
    max_text_tokens: int = 64
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.llm_trainable is None:
            self.llm_trainable = "lora" if self.lora else "frozen"
        if self.llm_trainable not in ("lora", "full", "frozen"):
            raise ValueError(f"llm_trainable must be lora, full or frozen, got {self.llm_trainable!r}")
        if self.llm_trainable == "lora" and not self.lora:
            raise ValueError("llm_trainable='lora' needs lora=True")
        if self.pooling not in (None, "mean", "last", "cls"):
            raise ValueError(f"pooling must be mean, last or cls, got {self.pooling!r}")
        if self.target_path not in ("vision", "composer"):
            raise ValueError(f"target_path must be vision or composer, got {self.target_path!r}")
        if self.residual and self.target_path != "vision":
            raise ValueError("residual=True needs target_path='vision' (the reference in target space)")
        if self.n_visual_tokens < 1:
            raise ValueError("n_visual_tokens must be >= 1")
        checks = [("composed_template", 1, 1), ("image_template", 1, 0), ("text_template", 0, 1)]
        if self.prototype_template is not None:
            checks.append(("prototype_template", 1, 1))
        for name, n_img, n_text in checks:
            t = getattr(self, name)
            if t.count(IMG) != n_img or t.count(TEXT) != n_text:
                raise ValueError(f"{name} must hold {IMG} {n_img}x and {TEXT} {n_text}x: {t!r}")
        if self.lora_targets is not None:
            self.lora_targets = list(self.lora_targets)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ComposerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ComposerConfig keys: {', '.join(sorted(unknown))}")
        return cls(**d)


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


def _split_template(template: str) -> list[str]:
    """'a <img> b {text}' -> ['a ', IMG, ' b ', TEXT] (markers kept, empty pieces dropped)."""
    parts, rest = [], template
    while rest:
        cut = [(rest.find(m), m) for m in (IMG, TEXT) if m in rest]
        if not cut:
            parts.append(rest)
            break
        i, m = min(cut)
        if i:
            parts.append(rest[:i])
        parts.append(m)
        rest = rest[i + len(m):]
    return parts


class Composer(nn.Module):
    def __init__(self, cfg: ComposerConfig, loss_cfg: LossConfig | None = None, *,
                 llm_folder=None, preprocess_cfg: dict | None = None, load_pretrained: bool = True):
        """load_pretrained=False (with llm_folder, preprocess_cfg) builds the architecture
        only, for `export.load_composer` to fill from a checkpoint."""
        super().__init__()
        from cir.encoders import _open_clip, parse_encoder_name, seeded_init, validate_encoder_name

        self.cfg = cfg
        self.loss_cfg = loss_cfg or LossConfig()
        name = validate_encoder_name(cfg.vision) if load_pretrained else parse_encoder_name(cfg.vision)
        pp = {}
        if preprocess_cfg:  # the exported preprocessing, which a pretrained tag may have set
            pp = dict(force_image_size=preprocess_cfg["size"], image_mean=preprocess_cfg["mean"],
                      image_std=preprocess_cfg["std"], image_interpolation=preprocess_cfg["interpolation"],
                      image_resize_mode=preprocess_cfg["resize_mode"])
        # Seeded as cir.train.sources.vision_encoder is, so a tower without weights (a built-in
        # config) is the one that computed the cached training features.
        with _quiet_logging(not load_pretrained), seeded_init(0):
            clip, _, self.preprocess = _open_clip().create_model_and_transforms(
                name.arch, pretrained=name.pretrained if load_pretrained else None, **pp)
        self.visual = clip.visual  # the text tower is not needed
        self.preprocess_cfg = dict(self.visual.preprocess_cfg)
        self.d_clip = getattr(self.visual, "output_dim", None)
        if self.d_clip is None:  # towers without the attribute: measure it
            with torch.no_grad():
                size = self.preprocess_cfg["size"]
                size = (size, size) if isinstance(size, int) else tuple(size)
                self.d_clip = self.visual(torch.zeros(1, 3, *size)).shape[-1]
        self.d_clip = int(self.d_clip)
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
        self.append_eos = self.decoder_only if cfg.append_eos is None else cfg.append_eos
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
        # shape [1], not 0-dim: DeepSpeed cannot build an engine around a 0-dim parameter.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

        self._pre, self._post = llm_lib.special_token_frame(self.tokenizer)
        tok = self.tokenizer
        self._eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else (self._eos or 0)
        self._templates = {}

    # ---- frozen parts stay in eval mode (no dropout / norm statistics drift) ----
    def train(self, mode: bool = True):
        super().train(mode)
        if not self.cfg.vision_trainable:
            self.visual.eval()
        return self

    def scale(self) -> torch.Tensor:
        return clamp_logit_scale(self.logit_scale)

    @property
    def _left_pad(self) -> bool:
        # encoders are always right-padded: their absolute positions start at the first slot
        return self.decoder_only and self.tokenizer.padding_side == "left"

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised CLIP image embeddings [B, d_clip] of preprocessed pixels."""
        with torch.set_grad_enabled(self.cfg.vision_trainable and torch.is_grad_enabled()):
            feats = self.visual(pixels.to(self.device))
        return F.normalize(feats.float(), dim=-1)

    # ---- prompt assembly ----
    def _template_ids(self, template: str) -> list:
        if template not in self._templates:
            pieces = []
            for p in _split_template(template):
                pieces.append(p if p in (IMG, TEXT) else
                              self.tokenizer(p, add_special_tokens=False)["input_ids"])
            self._templates[template] = pieces
        return self._templates[template]

    def _prompt_batch(self, template: str, texts, batch: int):
        """Token ids [B, L] (-1 where visual tokens go), attention mask [B, L]."""
        pieces = self._template_ids(template)
        text_ids = None
        if texts is not None:
            text_ids = self.tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]
        rows = []
        for i in range(batch):
            row = list(self._pre)
            for p in pieces:
                if p == IMG:
                    row += [-1] * self.cfg.n_visual_tokens
                elif p == TEXT:
                    row += text_ids[i][: self.cfg.max_text_tokens]
                else:
                    row += p
            row += self._post
            if self.append_eos and self._eos is not None and (not row or row[-1] != self._eos):
                row.append(self._eos)
            rows.append(row)
        length = max(len(r) for r in rows)
        ids = torch.full((batch, length), self._pad, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if self._left_pad else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def _run(self, template: str, texts, visual_tokens: torch.Tensor | None, batch: int,
             residual: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = self._prompt_batch(template, texts, batch)
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
        """The retrieval query of (reference, text): the composed query, or under PTHA
        (the objective this model was last trained with) hop 2 over the hop-1 prototype,
        since that is the query PTHA aligns with the target."""
        if self.loss_cfg.objective == "ptha" and self.prototype_adapter is not None:
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

    # ---- training ----
    def _feats(self, batch: dict, key: str) -> torch.Tensor:
        if batch.get(f"{key}_feats") is not None:
            return batch[f"{key}_feats"].to(self.device, torch.float32)
        if batch.get(f"{key}_pixels") is not None:
            return self.image_features(batch[f"{key}_pixels"])
        raise KeyError(f"batch needs {key}_feats or {key}_pixels")

    def forward(self, batch: dict, loss_cfg: LossConfig | None = None) -> dict:
        """The training loss, computed here because ZeRO-3 gathers parameters only inside
        forward. batch: ref_feats | ref_pixels, tgt_feats | tgt_pixels, texts; optional
        reverse_texts (ptha; None rows are left out of L_p2p) and captions (collm3: the
        text-only query's text, default the modification texts)."""
        lc = loss_cfg or self.loss_cfg
        texts = list(batch["texts"])
        ref, tgt = self._feats(batch, "ref"), self._feats(batch, "tgt")
        target = self.encode_target(tgt)
        scale = self.scale()
        if lc.objective == "infonce":
            q = self.encode_composed(ref, texts)
            loss = info_nce(q, target, scale, lc.gather, lc.symmetric)
            out = {"loss": loss, "composed": loss.detach()}
        elif lc.objective == "collm3":
            w = lc.collm_weights
            comp = self.encode_composed(ref, texts) if w[0] else None
            img = self.encode_image_query(ref if lc.collm_image_query == "ref" else tgt) if w[1] else None
            captions = batch.get("captions")
            txt = self.encode_text_query(list(captions) if captions is not None else texts) if w[2] else None
            out = collm_three_way(comp, img, txt, target, scale, w, lc.gather, lc.symmetric)
        elif lc.objective == "ptha":
            out = self._ptha(batch, lc, ref, tgt, texts, target, scale)
        else:
            raise ValueError(f"unknown objective {lc.objective!r}")
        out = {k: (v if k == "loss" else v.detach()) for k, v in out.items()}
        out["logit_scale"] = scale.detach().reshape(())
        return out

    def _ptha(self, batch, lc, ref, tgt, texts, target, scale) -> dict:
        proto = self.encode_composed(ref, texts)              # hop 1
        query = self.encode_prototype_composed(proto, texts)  # hop 2
        t2t = self.encode_text_query(texts) if lc.w_t2t else None
        rev_texts = batch.get("reverse_texts")
        keep = [i for i, t in enumerate(rev_texts or []) if t is not None]
        rev = None
        if keep and lc.w_p2p:
            # the reverse side is stop-gradient anyway: no graph saves memory and time.
            with torch.no_grad():
                rev = self.encode_composed(tgt[keep], [rev_texts[i] for i in keep])
            proto = proto[keep]
        return ptha_loss(query, target, t2t, proto, rev, scale, lc.w_t2t, lc.w_p2p, lc.p2p_kind, lc.gather)

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


def build_composer(cfg: ComposerConfig | None = None, loss_cfg: LossConfig | None = None) -> Composer:
    return Composer(cfg or ComposerConfig(), loss_cfg)
