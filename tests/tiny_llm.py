"""A tiny chat model built in code, for tests of the LLM backends (no model hub here).

A word-level tokenizer with a chat template, and a 2-layer Llama trained for a few
seconds to give one fixed answer to the modify prompt and another to the reverse
prompt, whatever the captions: so a test knows exactly what the model will say, and
that answer exercises the parser and the filter (a preamble, a duplicate, a short text).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MODIFY_ANSWER = ("Sure! Here are 3 requests:\n1. make the red circle blue\n2. make the red circle blue\n"
                 "3. remove it")
MODIFY_TEXTS = ["make the red circle blue", "make the red circle blue", "remove it"]
REVERSE_ANSWER = "make the blue circle red"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")
SPECIAL = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _words(text: str) -> list[str]:
    return text.replace("\n", " \n ").split(" ")


def training_conversations(n: int, seed: int = 0):
    """(messages, answer) pairs over random shapes captions, both prompts."""
    from cir.data.shapes import caption as scene_caption
    from cir.data.shapes import random_scene
    from cir.generate.prompting import load_prompt

    rng = np.random.default_rng(seed)
    modify, reverse = load_prompt("modify.v1"), load_prompt("reverse.v1")
    out = []
    for i in range(n):
        a, b = scene_caption(random_scene(rng)), scene_caption(random_scene(rng))
        if i % 2:
            out.append((reverse.render(a, b, 1), REVERSE_ANSWER))
        else:
            out.append((modify.render(a, b, 3), MODIFY_ANSWER))
    return out


def build_tiny_chat_model(folder: Path, steps: int = 120, seed: int = 0) -> Path:
    """Train and save the tiny chat model into `folder` (a `save_pretrained` folder)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    convs = training_conversations(64, seed)
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for messages, answer in convs:
        for text in [m["content"] for m in messages] + [answer, "\n"]:
            for w in _words(text):
                vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|end|>", chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=vocab["<|end|>"], bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    examples = []
    for messages, answer in convs:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [cfg.eos_token_id]
        examples.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [examples[(step * 8 + j) % len(examples)] for j in range(8)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[0] * (width - len(i)) + i for i, _ in batch])
        labels = torch.tensor([[-100] * (width - len(lab)) + lab for _, lab in batch])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(i) for i, _ in batch])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
