"""The composer's typed config (no torch: jobs validate it before anything loads)."""
from __future__ import annotations

from dataclasses import dataclass

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
    lora_targets: list[str] | None = None    # None: by model type (llm.default_lora_targets)
    n_visual_tokens: int = 4
    adapter_hidden: int | None = None        # None: the LLM hidden size
    pooling: str | None = None               # mean | last | cls; None: mean (encoder) / last (decoder)
    append_eos: bool | None = None           # None: True for decoder-only models (last-token pooling
                                             # reads the EOS state, as SFR-Embedding / E5-Mistral do)
    embed_dim: int | None = None             # None: the CLIP embed dim
    target_path: str = "vision"              # vision | composer
    prototype_adapter: bool = True           # PTHA hop 2 (unused by infonce/collm3)
    residual: bool = False                   # composed query = LLM output + reference in target space
    # The retrieval query: 1, the composed query; 2, PTHA's hop 2 over the hop-1 prototype.
    # Training sets it to what the stage's objective aligns with the target, so an export
    # carries the query it was trained for.
    query_hops: int = 1
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
        if self.query_hops not in (1, 2):
            raise ValueError(f"query_hops must be 1 or 2, got {self.query_hops}")
        if self.query_hops == 2 and not self.prototype_adapter:
            raise ValueError("query_hops=2 (PTHA's hop-2 query) needs prototype_adapter=True")
        checks = [("composed_template", 1, 1), ("image_template", 1, 0), ("text_template", 0, 1)]
        if self.prototype_template is not None:
            checks.append(("prototype_template", 1, 1))
        for name, n_img, n_text in checks:
            t = getattr(self, name)
            if t.count(IMG) != n_img or t.count(TEXT) != n_text:
                raise ValueError(f"{name} must hold {IMG} {n_img}x and {TEXT} {n_text}x: {t!r}")
        if self.lora_targets is not None:
            self.lora_targets = list(self.lora_targets)


GENERATOR_TASKS = ("modification", "caption")
BRIDGES = ("mlp", "qformer")
VISION_FEATURES = ("final", "embed+final")


@dataclass
class GeneratorConfig:
    """The MTST text generator: a frozen vision tower, a bridge from its tokens into the
    LM's input space, and a causal LM that writes a modification text (two images) or
    a caption (one)."""

    # open_clip name; frozen. cir-shapes-cells: one patch token per shapes grid cell
    # (cir-shapes' tokens do not carry each object's look: cir/weights/README.md)
    vision: str = "cir-shapes-cells"
    # final: the tower's output patch tokens | embed+final: each also with its patch
    # embedding (the conv before the transformer), which keeps local detail (a shape's
    # outline) that a small tower's last layer mixes away; LLaVA reads an earlier layer too
    vision_features: str = "final"
    lm: str = "builtin:tiny-gpt"             # HF causal-LM id or folder, or builtin:tiny-gpt
    lm_dtype: str = "float32"
    lm_trainable: str = "full"               # full | lora | frozen (lora/frozen: a pretrained LM)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    # builtin:tiny-gpt, trained from scratch: a Llama-style decoder of this size over a
    # byte-level BPE vocabulary fitted to the training texts.
    lm_hidden: int = 192
    lm_layers: int = 3
    lm_heads: int = 4
    vocab_size: int = 1024
    bridge: str = "mlp"                      # mlp: every patch token | qformer: learned queries
    n_queries: int = 16                      # qformer: prefix tokens per image
    bridge_layers: int = 2                   # qformer: cross-attention layers
    # modification: also give the bridge target - reference, patch by patch (what changed)
    difference_tokens: bool = True
    max_text_tokens: int = 192               # a shapes pair's exhaustive text takes up to ~120
    modification_prompt: str = "Describe how to change the first image into the second:"
    caption_prompt: str = "Describe the image:"

    def __post_init__(self):
        if self.lm_trainable not in ("lora", "full", "frozen"):
            raise ValueError(f"lm_trainable must be lora, full or frozen, got {self.lm_trainable!r}")
        if self.vision_features not in VISION_FEATURES:
            raise ValueError(f"vision_features must be one of {', '.join(VISION_FEATURES)}, "
                             f"got {self.vision_features!r}")
        if self.bridge not in BRIDGES:
            raise ValueError(f"bridge must be one of {', '.join(BRIDGES)}, got {self.bridge!r}")
        if self.lm.startswith("builtin:") and self.lm_trainable != "full":
            raise ValueError(f"{self.lm} is trained from scratch: lm_trainable must be full")
        for name in ("n_queries", "bridge_layers", "max_text_tokens", "lm_layers", "lm_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lm_hidden % self.lm_heads:
            raise ValueError(f"lm_hidden ({self.lm_hidden}) must be a multiple of lm_heads ({self.lm_heads})")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges + specials), got {self.vocab_size}")
        if self.lora_targets is not None:
            self.lora_targets = list(self.lora_targets)

    def prompt(self, task: str) -> str:
        if task not in GENERATOR_TASKS:
            raise ValueError(f"unknown generator task {task!r}; expected one of {GENERATOR_TASKS}")
        return self.modification_prompt if task == "modification" else self.caption_prompt
