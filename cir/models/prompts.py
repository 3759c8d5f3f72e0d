"""The composer's prompts as token ids, built for a whole batch at once.

A template holds `<img>` (where the visual tokens go) and at most one `{text}`. It is
tokenised once: the ids before the text (the model's own leading special tokens, the
template's words, -1 at the visual-token slots) and the ids after it (the rest of the
template, the trailing special tokens). Only the text varies between rows, so a batch
is [prefix | the row's text ids | suffix | EOS when asked], padded on the side the model
pads, assembled by index arithmetic instead of per-row Python.
"""
from __future__ import annotations

import torch

from cir.models import llm as llm_lib
from cir.models.config import IMG, TEXT


def split_template(template: str) -> list[str]:
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


class PromptBuilder:
    def __init__(self, tokenizer, n_visual_tokens: int, max_text_tokens: int, append_eos: bool,
                 decoder_only: bool):
        self.tokenizer = tokenizer
        self.n_visual_tokens, self.max_text_tokens = n_visual_tokens, max_text_tokens
        self.decoder_only = decoder_only
        self.pre, self.post = llm_lib.special_token_frame(tokenizer)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.eos = eos if append_eos else None
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        self._parts: dict[str, tuple[list[int], list[int]]] = {}

    @property
    def left_pad(self) -> bool:
        # encoders are always right-padded: their absolute positions start at the first slot
        return self.decoder_only and self.tokenizer.padding_side == "left"

    def parts(self, template: str) -> tuple[list[int], list[int]]:
        """(prefix ids, suffix ids) of a template, special tokens included; -1 marks the
        visual-token slots. A template without `{text}` is all prefix."""
        if template not in self._parts:
            ids, prefix = list(self.pre), None
            for piece in split_template(template):
                if piece == IMG:
                    ids += [-1] * self.n_visual_tokens
                elif piece == TEXT:
                    prefix, ids = ids, []
                else:
                    ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += self.post
            self._parts[template] = (ids, []) if prefix is None else (prefix, ids)
        return self._parts[template]

    def _text_ids(self, texts, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's text ids, truncated to `max_text_tokens`, zero-padded [B, T]; lengths [B]."""
        rows = self.tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]
        rows = [r[: self.max_text_tokens] for r in rows]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        text = torch.zeros((batch, int(lengths.max()) if batch else 0), dtype=torch.long)
        for i, r in enumerate(rows):
            text[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return text, lengths

    def __call__(self, template: str, texts, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] (-1 at the visual-token slots) and the attention mask [B, L]."""
        prefix, suffix = (torch.tensor(part, dtype=torch.long) for part in self.parts(template))
        if texts is not None and TEXT in template:
            text, n_text = self._text_ids(texts, batch)
        else:
            text, n_text = torch.zeros((batch, 0), dtype=torch.long), torch.zeros(batch, dtype=torch.long)
        p, t, s = len(prefix), text.shape[1], len(suffix)
        add_eos = torch.zeros(batch, dtype=torch.bool)
        if self.eos is not None:  # appended unless the row already ends with it
            add_eos = _last_tokens(prefix, text, n_text, suffix) != self.eos
        length = p + n_text + s + add_eos.long()
        width = int(length.max()) if batch else 0
        # Each row is a window on its buffer [prefix | text (padded to t) | suffix | EOS]:
        # position j takes buffer[j] in the prefix and text, and skips the text's padding after.
        eos = torch.tensor([self.pad if self.eos is None else self.eos])
        buffer = torch.cat([prefix.expand(batch, p), text, suffix.expand(batch, s), eos.expand(batch, 1)], 1)
        pos = torch.arange(width).expand(batch, width)
        if self.left_pad:
            pos = pos - (width - length)[:, None]
        after_text = pos - p - n_text[:, None]
        src = torch.where(after_text < 0, pos, p + t + after_text)
        mask = (pos >= 0) & (pos < length[:, None])
        ids = buffer.gather(1, src.clamp(0, buffer.shape[1] - 1))
        return torch.where(mask, ids, torch.full_like(ids, self.pad)), mask.long()


def _last_tokens(prefix: torch.Tensor, text: torch.Tensor, n_text: torch.Tensor, suffix: torch.Tensor):
    """Each row's last token (-2 for an empty row)."""
    batch = len(n_text)
    if len(suffix):
        return suffix[-1].expand(batch)
    before = prefix[-1] if len(prefix) else torch.tensor(-2)
    if text.shape[1] == 0:
        return before.expand(batch)
    return torch.where(n_text > 0, text.gather(1, (n_text - 1).clamp_min(0)[:, None])[:, 0], before)
