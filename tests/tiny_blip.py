"""A tiny BLIP captioner built in code, for tests of the `hf` captioner (no model hub here).

A word-level BERT tokenizer over a handful of words, and a one-layer BLIP trained for a
few seconds to say `CAPTION` for any image: so a test knows exactly what the captioner
writes, and that caption is a valid shapes caption that passes the quality filter (the
template backend after the captions step parses it). It is saved the way a hub
checkpoint is, so `AutoProcessor` / `AutoModelForImageTextToText` load it by folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CAPTION = "a small red circle at the top left"
# BERT's specials, and BLIP's decoder start token: generate() begins every caption with it.
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def training_images(n: int, seed: int = 0) -> list:
    """Random shapes scenes, like the corpora the tests caption."""
    from cir.data.shapes import random_scene, render

    rng = np.random.default_rng(seed)
    return [render(random_scene(rng), 64, seed=i) for i in range(n)]


def build_processor(folder: Path):
    """A BlipProcessor: 32-pixel images and a word-level BERT tokenizer whose vocab is the caption."""
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + sorted(set(CAPTION.split()))) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab), bos_token="[DEC]")   # (v5: `vocab_file=` is silently ignored)
    return BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)


def build_tiny_blip(folder: Path, steps: int = 60, seed: int = 0) -> Path:
    """Train and save the tiny BLIP (model and processor) into `folder`."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    processor = build_processor(folder)
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(seed)
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": ids("[PAD]"),
            "bos_token_id": ids("[DEC]"), "sep_token_id": ids("[SEP]"), "eos_token_id": ids("[SEP]")}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    pixels = processor(images=training_images(32, seed), return_tensors="pt")["pixel_values"]
    # What generate() produces: [DEC], the caption's words, [SEP] (its stop token).
    target = [ids("[DEC]")] + tok(CAPTION, add_special_tokens=False)["input_ids"] + [ids("[SEP]")]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a 30k-parameter model: more threads only fight over 2 busy cores (~50x slower)
    model.train()
    for step in range(steps):
        batch = pixels[(step * 8) % len(pixels):][:8]
        input_ids = torch.tensor([target] * len(batch))
        loss = model(pixel_values=batch, input_ids=input_ids, labels=input_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
