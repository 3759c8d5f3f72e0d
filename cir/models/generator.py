"""The MTST text generator: a small vision-language model that writes the modification
text of an image pair (reference, target), or the caption of one image.

    pixels -> frozen open_clip tower -> patch tokens [B, T, d]      (per image)
           -> bridge -> prefix tokens in the LM's input space       (both images)
           -> [prefix][task prompt] -> causal LM -> text, token by token

The bridge is `mlp` (every patch token through an MLP, LLaVA style, tagged with which
image and which patch it is) or `qformer` (learned queries that cross-attend to the
patch tokens of both images, the Q-Former that MTST fine-tunes in InstructBLIP). The
LM is any Hugging Face causal LM (LoRA or full fine-tuning), or `builtin:tiny-gpt`, a
small Llama-style decoder trained from scratch over a byte-level BPE vocabulary fitted
to the training texts, for machines without a model hub. The loss is the LM's
cross-entropy on the text tokens (and the closing EOS) only.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from cir.models import llm as llm_lib
from cir.models.config import GeneratorConfig
from cir.models.vision import build_vision_tower

BUILTIN_LM = "builtin:tiny-gpt"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
MAX_IMAGES = 3  # reference, target, and their patch-wise difference


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer fitted to `texts` (any text round-trips exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def _builtin_lm(cfg: GeneratorConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.lm_hidden, num_hidden_layers=cfg.lm_layers,
                         num_attention_heads=cfg.lm_heads, num_key_value_heads=cfg.lm_heads,
                         intermediate_size=4 * cfg.lm_hidden, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def load_causal_lm(cfg: GeneratorConfig, tokenizer=None, folder=None):
    """(model, tokenizer). `folder`: an export's LM folder (architecture only, random
    weights that the caller overwrites); a builtin LM needs `tokenizer` otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = llm_lib._dtype(cfg.lm_dtype)
    if folder is not None:
        tokenizer = llm_lib.load_tokenizer(folder)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=dtype)
    elif cfg.lm == BUILTIN_LM:
        if tokenizer is None:
            raise ValueError(f"{BUILTIN_LM} needs a tokenizer fitted to the training texts (train_tokenizer)")
        model = _builtin_lm(cfg, tokenizer).to(dtype)
    elif cfg.lm.startswith(llm_lib.BUILTIN_PREFIX):
        raise ValueError(f"unknown builtin LM {cfg.lm!r}; the generator's is {BUILTIN_LM}")
    else:
        tokenizer = llm_lib.load_tokenizer(cfg.lm)
        model = AutoModelForCausalLM.from_pretrained(cfg.lm, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{cfg.lm}: the tokenizer has no EOS token to end a text with")
    return model, tokenizer


class MLPBridge(nn.Module):
    """Every image token to one prefix token, plus which image and which patch it is."""

    def __init__(self, d_in: int, hidden: int, n_tokens: int, init_rms: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.image = nn.Parameter(torch.randn(MAX_IMAGES, 1, hidden) * 0.02)
        self.position = nn.Parameter(torch.randn(1, n_tokens, hidden) * 0.02)
        self.norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.norm.weight.fill_(init_rms)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.norm(torch.cat([self.mlp(x) + self.position + self.image[i] for i, x in enumerate(images)], 1))


class QFormerBridge(nn.Module):
    """Learned queries that read the tokens of all images by cross-attention."""

    def __init__(self, d_in: int, hidden: int, n_tokens: int, init_rms: float, n_queries: int, layers: int,
                 width: int = 256, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.image = nn.Parameter(torch.randn(MAX_IMAGES, 1, width) * 0.02)
        self.position = nn.Parameter(torch.randn(1, n_tokens, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, n_queries * MAX_IMAGES, width) * 0.02)
        self.n_queries = n_queries
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        with warnings.catch_warnings():  # norm_first disables a fast path we do not need
            warnings.simplefilter("ignore", UserWarning)
            self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            self.norm.weight.fill_(init_rms)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        memory = torch.cat([self.inp(x) + self.position + self.image[i] for i, x in enumerate(images)], 1)
        queries = self.queries[:, : self.n_queries * len(images)].expand(memory.shape[0], -1, -1)
        return self.norm(self.out(self.decoder(queries, memory)))


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, *, tokenizer=None, lm_folder=None, preprocess_cfg: dict | None = None,
                 load_pretrained: bool = True):
        """load_pretrained=False (with lm_folder, preprocess_cfg) builds the architecture
        only, for `load_generator` to fill from an export."""
        super().__init__()
        self.cfg = cfg
        tower = build_vision_tower(cfg.vision, load_pretrained, preprocess_cfg)
        self.visual, self.preprocess, self.preprocess_cfg, _ = tower
        self.visual.requires_grad_(False)
        if hasattr(self.visual, "output_tokens"):
            self.visual.output_tokens = True
        if cfg.vision_features == "embed+final" and not isinstance(getattr(self.visual, "conv1", None), nn.Conv2d):
            raise ValueError(f"vision_features 'embed+final' needs a ViT tower with a patch-embedding conv; "
                             f"{cfg.vision} has none")
        with torch.no_grad():
            size = self.preprocess_cfg["size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            probe = self._tokens(torch.zeros(1, 3, *size))
        self.n_image_tokens, self.d_image = probe.shape[1], probe.shape[2]

        lm, self.tokenizer = load_causal_lm(cfg, tokenizer, lm_folder)
        emb = lm.get_input_embeddings()
        self.hidden = int(emb.embedding_dim)
        w = emb.weight.detach()
        init_rms = float(w.float().pow(2).mean().sqrt()) if w.numel() else 1.0
        if cfg.lm_trainable == "lora":
            lm = llm_lib.apply_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        llm_lib.set_llm_trainable(lm, cfg.lm_trainable)
        self.lm = lm
        if cfg.bridge == "mlp":
            self.bridge = MLPBridge(self.d_image, self.hidden, self.n_image_tokens, init_rms)
        else:
            self.bridge = QFormerBridge(self.d_image, self.hidden, self.n_image_tokens, init_rms, cfg.n_queries,
                                        cfg.bridge_layers)
        self._prompt_ids: dict[str, list[int]] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.visual.eval()  # frozen: no dropout, no norm statistics drift
        return self

    @property
    def device(self) -> torch.device:
        return self.bridge.norm.weight.device

    # -- inputs ----------------------------------------------------------------
    def pixels(self, images) -> torch.Tensor:
        """Preprocessed pixels [B, 3, H, W] of encoded images (bytes) or PIL images."""
        from PIL import Image

        from cir.encoders import decode_image

        out = []
        for im in images:
            im = decode_image(im) if isinstance(im, (bytes, bytearray)) else im
            out.append(self.preprocess(im.convert("RGB") if isinstance(im, Image.Image) else im))
        return torch.stack(out)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual(pixels)
        if not isinstance(out, tuple):
            return out.float().unsqueeze(1)  # a tower without patch tokens: its pooled vector
        tokens = out[1].float()  # (pooled, patch tokens)
        if self.cfg.vision_features == "embed+final":   # one more run of the (cheap) patch conv
            embed = self.visual.conv1(pixels).flatten(2).transpose(1, 2)   # [B, width, h, w] -> [B, h*w, width]
            tokens = torch.cat([embed.float(), tokens], -1)
        return tokens

    def _visual(self, task: str, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The bridge's prefix tokens of a batch's images."""
        n = {"modification": 2, "caption": 1}[task]
        if len(pixels) != n:
            raise ValueError(f"task {task!r} takes {n} image(s) per example, got {len(pixels)}")
        with torch.no_grad():
            dtype = next(self.visual.parameters()).dtype
            images = [self._tokens(p.to(self.device, dtype)) for p in pixels]
        if task == "modification" and self.cfg.difference_tokens:
            images.append(images[1] - images[0])
        return self.bridge([x.to(self.bridge.norm.weight.dtype) for x in images])

    def _prefix(self, task: str, visual: torch.Tensor, prompt: str | None) -> torch.Tensor:
        """[visual][prompt] embeddings; prompt None: the task's prompt of the config."""
        prompt = self.cfg.prompt(task) if prompt is None else prompt
        if prompt not in self._prompt_ids:
            self._prompt_ids[prompt] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        embed = self.lm.get_input_embeddings()
        ids = torch.tensor(self._prompt_ids[prompt], device=self.device, dtype=torch.long)
        prompt_embeds = embed(ids).unsqueeze(0).expand(visual.shape[0], -1, -1)
        return torch.cat([visual.to(prompt_embeds.dtype), prompt_embeds], 1)

    # -- training and generation -------------------------------------------------
    def forward(self, task: str, pixels: list[torch.Tensor], texts: list[str],
                prompts: list[str | None] | None = None) -> dict:
        """{"loss", "tokens"}: mean cross-entropy over the text tokens and their EOS.
        `prompts`: each example's prompt (None: the task's); a batch that mixes prompts
        (a stage rehearsing an earlier one's data) runs the LM once per prompt."""
        visual = self._visual(task, pixels)
        prompts = prompts if prompts is not None else [None] * len(texts)
        groups: dict = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        loss_sum, tokens = 0.0, 0
        for prompt, idx in groups.items():
            out = self._text_loss(self._prefix(task, visual[idx], prompt), [texts[i] for i in idx])
            loss_sum, tokens = loss_sum + out["loss"] * out["tokens"], tokens + out["tokens"]
        return {"loss": loss_sum / tokens, "tokens": tokens}

    def _text_loss(self, prefix: torch.Tensor, texts: list[str]) -> dict:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ids = [x[: self.cfg.max_text_tokens - 1] + [eos] for x in
               self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        longest = max(map(len, ids))
        text_ids = torch.tensor([x + [pad] * (longest - len(x)) for x in ids], device=self.device)
        text_mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids], device=self.device)
        b, p = prefix.shape[:2]
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(text_ids)], 1)
        mask = torch.cat([torch.ones(b, p, dtype=text_mask.dtype, device=self.device), text_mask], 1)
        labels = torch.cat([torch.full((b, p), -100, device=self.device), text_ids.masked_fill(text_mask == 0, -100)], 1)
        out = self.lm(inputs_embeds=inputs, attention_mask=mask, labels=labels)
        return {"loss": out.loss, "tokens": int(text_mask.sum())}

    @torch.no_grad()
    def generate(self, task: str, pixels: list[torch.Tensor], max_new_tokens: int | None = None,
                 num_beams: int = 1, prompt: str | None = None) -> list[str]:
        """Greedy (or beam) texts, one per example, after `prompt` (None: the task's).
        Every prefix has the same length, so a batch needs no padding."""
        prefix = self._prefix(task, self._visual(task, pixels), prompt)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
        tok = self.tokenizer
        out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, do_sample=False, num_beams=num_beams,
                               max_new_tokens=max_new_tokens or self.cfg.max_text_tokens,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def build_generator(cfg: GeneratorConfig, tokenizer=None) -> Generator:
    return Generator(cfg, tokenizer=tokenizer)


# ---------------------------------------------------------------------------- export
# An export is self-contained like the composer's (`cir.models.export`): config.json
# (format, GeneratorConfig, preprocessing), model.safetensors (every tensor, the
# frozen tower's too, LoRA unmerged) and lm/ (the LM's HF config and tokenizer files).
FORMAT, FORMAT_VERSION = "cir-generator", 1


def export_generator(model: Generator, out_dir, extra: dict | None = None):
    """Write `model` to `out_dir`, replacing an earlier export atomically."""
    from dataclasses import asdict
    from pathlib import Path

    from safetensors.torch import save_file

    from cir.models.export import CONFIG_FILE, WEIGHTS_FILE, _jsonable
    from cir.outputs import atomic_path, write_json_atomic

    out = Path(out_dir).resolve()
    with atomic_path(out, directory=True) as tmp:
        llm_lib.unwrap(model.lm).config.save_pretrained(tmp / "lm")
        model.tokenizer.save_pretrained(str(tmp / "lm"))
        save_file(_unshared_state(model), str(tmp / WEIGHTS_FILE),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        write_json_atomic(tmp / CONFIG_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "generator": asdict(model.cfg),
            "weights": WEIGHTS_FILE, "lm_folder": "lm", "preprocess_cfg": _jsonable(model.preprocess_cfg),
            "extra": extra or {},
        })
    return out


def _unshared_state(model) -> dict:
    """Every tensor once: a tied LM's input and output embeddings are one tensor, kept
    under its first name (safetensors' `load_model` matches either), each cloned (under
    DeepSpeed parameters are views into flat buffers)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().to("cpu").clone().contiguous()
    return state


def read_generator_config(out_dir) -> dict:
    """The export's config.json (a local folder or a `cir.storage` URI / location)."""
    import json

    from cir.storage import resolve

    path = resolve(out_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} is not an exported text generator (no config.json); "
                                "train one with jobs/train_generator.py")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} (jobs/train_generator.py)")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this code reads")
    return meta


def load_generator(out_dir, device: str = "cpu", dtype: str | None = None) -> Generator:
    """Rebuild an exported generator in eval mode from JSON, tokenizer files and
    safetensors only (no pickle, no hub); a URI's export through the local cache
    (`cir.storage.local_copy`)."""
    from safetensors.torch import load_model

    from cir.config import from_dict
    from cir.models.export import preprocess_from_json
    from cir.storage import local_copy

    out = local_copy(out_dir, "text generator export")
    meta = read_generator_config(out)
    cfg = from_dict(GeneratorConfig, meta["generator"], f"{out / 'config.json'}: generator")
    pre = preprocess_from_json(meta["preprocess_cfg"])
    with torch.random.fork_rng(devices=[]):
        model = Generator(cfg, lm_folder=out / meta["lm_folder"], preprocess_cfg=pre, load_pretrained=False)
    load_model(model, str(out / meta["weights"]), strict=True)
    model = model.to(device).eval()
    return model.to(llm_lib._dtype(dtype)) if dtype else model
